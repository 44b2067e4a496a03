package pages

import (
	"encoding/binary"
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

func parsePageMap(pid int, img []byte, each func(e *pagemap.PagemapEntry, n uint64)) (*PageMap, error) {
	m := magic.LoadMagic()
	if len(img) < 4 {
		return nil, fmt.Errorf("pagemap-%d.img: too short", pid)
	}
	v := uint64(binary.LittleEndian.Uint32(img))
	img = img[4:]
	if v == m.ByName["IMG_COMMON"] || v == m.ByName["IMG_SERVICE"] {
		if len(img) < 4 {
			return nil, fmt.Errorf("pagemap-%d.img: too short", pid)
		}
		v = uint64(binary.LittleEndian.Uint32(img))
		img = img[4:]
	}
	if v != m.ByName["PAGEMAP"] {
		return nil, fmt.Errorf("pagemap-%d.img: magic %#x is not PAGEMAP", pid, v)
	}
	next := func(msg proto.Message) (bool, error) {
		if len(img) == 0 {
			return false, nil
		}
		if len(img) < 4 {
			return false, fmt.Errorf("pagemap-%d.img: truncated entry", pid)
		}
		n := int(binary.LittleEndian.Uint32(img))
		if len(img) < 4+n {
			return false, fmt.Errorf("pagemap-%d.img: truncated entry", pid)
		}
		err := proto.Unmarshal(img[4:4+n], msg)
		img = img[4+n:]
		return err == nil, err
	}
	var head pagemap.PagemapHead
	if ok, err := next(&head); !ok {
		return nil, fmt.Errorf("pagemap-%d.img: no head: %v", pid, err)
	}
	pm := &PageMap{PID: pid, PagesID: head.GetPagesId()}
	var total uint64
	for {
		var e pagemap.PagemapEntry
		ok, err := next(&e)
		if err != nil {
			return nil, err
		}
		if !ok {
			return pm, nil
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
			return nil, fmt.Errorf("pagemap-%d.img: implausible run of %d pages", pid, n)
		}
		if each != nil {
			each(&e, n)
		}
		if present && n > 0 {
			// A process's pages all fit a 48-bit address space.
			if total += n; total > 1<<36 {
				return nil, fmt.Errorf("pagemap-%d.img: more pages than an address space holds", pid)
			}
			pm.Runs = append(pm.Runs, Run{Vaddr: e.GetVaddr(), Pages: int(n)})
		}
	}
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
