package transfer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/migrate-project/migrate/overlaynet"
)

// A move is a distributed transaction between the source's agent and the target's. Each
// side writes the step it is about to take to its journal (one file per container,
// written atomically and synced) before taking it, so that an agent that restarts knows
// where every move it took part in stood.
//
// The source decides: a move is committed once the source's journal says so, which it
// writes only after the target said the container runs there. Before that decision every
// party converges to "runs on the source", after it to "runs on the target". A target that
// does not know the outcome asks the source; it never guesses.

// Source's states, in order.
const (
	OutStarted   = "started"   // the target is (being) prepared; the container runs here
	OutFrozen    = "frozen"    // traffic is held, the container is (being) checkpointed
	OutCommitted = "committed" // the target runs it: the decision is taken, forward only
	OutAborted   = "aborted"   // rolled back: it runs here; the target must drop its half
)

// Target's states, in order.
const (
	InPrepared  = "prepared"  // endpoint plumbed, pages may arrive
	InRestoring = "restoring" // podman is restoring the container here
	InRestored  = "restored"  // it runs here; the source has not told the outcome yet
)

// outgoingMove is the source's journal entry of a move.
type outgoingMove struct {
	Move      string              `json:"move"`
	Container string              `json:"container"`
	Target    string              `json:"target"`
	Endpoint  overlaynet.Endpoint `json:"endpoint"`
	State     string              `json:"state"`
	Updated   time.Time           `json:"updated"`
	// Acked: the target confirmed the outcome (it dropped its journal); the entry can go.
	Acked bool `json:"acked,omitempty"`
	// Volumes go with the source's copy of the container once the target has it.
	Volumes []string `json:"volumes,omitempty"`
}

// incomingMove is the target's journal entry of a move.
type incomingMove struct {
	Prepare PrepareRequest `json:"prepare"`
	State   string         `json:"state"`
	Updated time.Time      `json:"updated"`
}

// journal is a directory of JSON entries, one per container.
type journal struct{ dir string }

// maxJournalEntry bounds what is read back: an entry is a few hundred bytes.
const maxJournalEntry = 1 << 20

func (j journal) path(container string) (string, error) {
	if err := ValidContainerName(container); err != nil {
		return "", err
	}
	return filepath.Join(j.dir, container+".json"), nil
}

// put writes v as container's entry: to a temporary file, synced, renamed over the old
// entry, and the directory synced, so that a crash leaves the old entry or the new one.
func (j journal) put(container string, v any) error {
	p, err := j.path(container)
	if err != nil {
		return err
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if fault("disk-full") != nil {
		return fmt.Errorf("journal %s: %w (fault injected)", p, syscall.ENOSPC)
	}
	if err := os.MkdirAll(j.dir, 0o700); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	f, err := os.CreateTemp(j.dir, tempPrefix)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("journal %s: %w", p, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("journal %s: %w", p, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("journal %s: %w", p, err)
	}
	if err := os.Rename(f.Name(), p); err != nil {
		return fmt.Errorf("journal %s: %w", p, err)
	}
	return syncDir(j.dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// errNoEntry: the journal holds nothing for a container.
var errNoEntry = errors.New("no journal entry")

// get reads container's entry into v.
func (j journal) get(container string, v any) error {
	p, err := j.path(container)
	if err != nil {
		return err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return errNoEntry
	} else if err != nil {
		return err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxJournalEntry+1))
	if err != nil {
		return err
	}
	if len(b) > maxJournalEntry {
		return fmt.Errorf("journal %s: larger than %d bytes", p, maxJournalEntry)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("journal %s: %w", p, err)
	}
	return nil
}

// has reports whether the journal holds an entry for container.
func (j journal) has(container string) bool {
	p, err := j.path(container)
	if err != nil {
		return false
	}
	_, err = os.Stat(p)
	return err == nil
}

// remove deletes container's entry (none is fine).
func (j journal) remove(container string) error {
	p, err := j.path(container)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return syncDir(j.dir)
}

// tempPrefix starts the temporary file put writes before renaming it into place.
const tempPrefix = ".tmp-"

// clean removes the temporary files of writes that a crash cut short (the entry they were
// to replace is intact). The agent calls it when it starts, before anything writes.
func (j journal) clean() {
	ents, err := os.ReadDir(j.dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			if err := os.Remove(filepath.Join(j.dir, e.Name())); err != nil {
				slog.Warn("journal: a cut-short write's temporary file", "file", e.Name(), "err", err)
			}
		}
	}
}

// list names the containers the journal holds entries for.
func (j journal) list() []string {
	ents, err := os.ReadDir(j.dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if ok && ValidContainerName(name) == nil {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}
