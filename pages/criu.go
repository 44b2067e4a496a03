package pages

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/pagemap"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// CRIU's pagemap flags (criu/include/pagemap.h): only PE_PRESENT pages have their data in
// the pages image.
const (
	pePresent = 1 << 2
)

// PageMap is what a CRIU pagemap-PID.img says: which pages image holds the process's
// pages, and at which addresses they were, in the order of the image.
type PageMap struct {
	PID     int    // the process's PID in its PID namespace, as CRIU names images
	PagesID uint32 // the pages image: pages-PagesID.img
	Runs    []Run  // present pages, in image order
}

// Run is a run of pages at consecutive addresses.
type Run struct {
	Vaddr uint64
	Pages int
}

// Len is the number of pages the pages image holds for this map.
func (m *PageMap) Len() int {
	n := 0
	for _, r := range m.Runs {
		n += r.Pages
	}
	return n
}

// Addrs returns the address of each page in the pages image, in order.
func (m *PageMap) Addrs() []uint64 {
	out := make([]uint64, 0, m.Len())
	for _, r := range m.Runs {
		for i := 0; i < r.Pages; i++ {
			out = append(out, r.Vaddr+uint64(i)*Size)
		}
	}
	return out
}

// IsPageMap reports whether a name in a checkpoint archive is a CRIU pagemap image, and
// the PID it names.
func IsPageMap(name string) (int, bool) {
	dir, base := path.Split(strings.TrimPrefix(name, "./"))
	if strings.TrimSuffix(dir, "/") != "checkpoint" || !strings.HasPrefix(base, "pagemap-") || !strings.HasSuffix(base, ".img") {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(base, "pagemap-"), ".img"))
	return pid, err == nil
}

// ParsePageMap decodes a CRIU pagemap image (go-criu's protobuf types).
func ParsePageMap(pid int, img []byte) (*PageMap, error) {
	return parsePageMap(pid, img, nil)
}

// ImageEntries walks the entries of a CRIU image (criu/protobuf.c's format: the image's
// magic, after the common or service magic, then each entry as a 32-bit length and that
// many bytes of protobuf). It checks that the magic is want's (go-criu's names) and hands
// each entry to each, every length bounded by what the image holds: a damaged image is
// an error, never a panic or a large allocation.
func ImageEntries(name string, img []byte, want string, each func(entry []byte) error) error {
	m := magic.LoadMagic()
	if len(img) < 4 {
		return fmt.Errorf("%s: too short", name)
	}
	v := uint64(binary.LittleEndian.Uint32(img))
	img = img[4:]
	if v == m.ByName["IMG_COMMON"] || v == m.ByName["IMG_SERVICE"] {
		if len(img) < 4 {
			return fmt.Errorf("%s: too short", name)
		}
		v = uint64(binary.LittleEndian.Uint32(img))
		img = img[4:]
	}
	if v != m.ByName[want] {
		return fmt.Errorf("%s: magic %#x is not %s", name, v, want)
	}
	for len(img) > 0 {
		if len(img) < 4 {
			return fmt.Errorf("%s: truncated entry", name)
		}
		n := uint64(binary.LittleEndian.Uint32(img))
		if n > uint64(len(img)-4) {
			return fmt.Errorf("%s: truncated entry", name)
		}
		if err := each(img[4 : 4+n]); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		img = img[4+n:]
	}
	return nil
}

func parsePageMap(pid int, img []byte, each func(e *pagemap.PagemapEntry, n uint64)) (*PageMap, error) {
	var pm *PageMap
	var total uint64
	name := fmt.Sprintf("pagemap-%d.img", pid)
	err := ImageEntries(name, img, "PAGEMAP", func(b []byte) error {
		if pm == nil {
			var head pagemap.PagemapHead
			if err := proto.Unmarshal(b, &head); err != nil {
				return fmt.Errorf("head: %w", err)
			}
			pm = &PageMap{PID: pid, PagesID: head.GetPagesId()}
			return nil
		}
		var e pagemap.PagemapEntry
		if err := proto.Unmarshal(b, &e); err != nil {
			return err
		}
		present := !e.GetInParent()
		if e.Flags != nil {
			present = e.GetFlags()&pePresent != 0
		}
		n := uint64(e.GetNrPages())
		if n64, ok := nrPages64(&e); ok {
			n = n64
		}
		if n > 1<<36 {
			return fmt.Errorf("implausible run of %d pages", n)
		}
		if each != nil {
			each(&e, n)
		}
		if present && n > 0 {
			// A process's pages all fit a 48-bit address space.
			if total += n; total > 1<<36 {
				return errors.New("more pages than an address space holds")
			}
			pm.Runs = append(pm.Runs, Run{Vaddr: e.GetVaddr(), Pages: int(n)})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if pm == nil {
		return nil, fmt.Errorf("%s: no head", name)
	}
	return pm, nil
}

// PageMapEntries decodes every entry of a pagemap image (present or not), with its flags.
func PageMapEntries(pid int, img []byte) ([]MemEntry, error) {
	var out []MemEntry
	_, err := parsePageMap(pid, img, func(e *pagemap.PagemapEntry, n uint64) {
		flags := uint32(0)
		if e.Flags != nil {
			flags = e.GetFlags()
		} else if !e.GetInParent() {
			flags = FlagPresent
		}
		out = append(out, MemEntry{Vaddr: e.GetVaddr(), Pages: n, Flags: flags})
	})
	return out, err
}

// nrPages64 reads the 64-bit page count CRIU 4 writes as field 5 (the 32-bit field 2
// became compat_nr_pages and is 0 then). go-criu's generated type predates it, so it is
// among the entry's unknown fields.
func nrPages64(e *pagemap.PagemapEntry) (uint64, bool) {
	b := e.ProtoReflect().GetUnknown()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
		if num == 5 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			return v, n >= 0
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return 0, false
		}
		b = b[n:]
	}
	return 0, false
}

// NSPid returns the PID of host process pid inside its own (innermost) PID namespace: the
// PID CRIU's images name it by.
func NSPid(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				break
			}
			return strconv.Atoi(f[len(f)-1])
		}
	}
	return 0, fmt.Errorf("process %d: no NSpid in its status", pid)
}
