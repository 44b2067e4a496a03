package pages

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Processes returns the host PIDs of every process in the PID namespace of init (a
// container's first process), init first.
func Processes(init int) ([]int, error) {
	want, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/pid", init))
	if err != nil {
		return nil, fmt.Errorf("container process %d: %w", init, err)
	}
	pids := []int{init}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == init {
			continue
		}
		if ns, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns/pid")); err == nil && ns == want {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// Chunk is a run of present pages of one process, read while it runs.
type Chunk struct {
	PID    int      // on this host
	NSPid  int      // in the container's PID namespace: the PID CRIU's images use
	Addrs  []uint64 // virtual address of each page
	Data   []byte   // len(Addrs)*Size bytes
	Hashes []Hash   // the name of each page
}

// vma is one mapping worth copying: private and writable, the memory CRIU dumps.
type vma struct{ start, end uint64 }

func writableMappings(pid int, noExec bool) ([]vma, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []vma
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || len(fields[1]) < 4 || fields[1][1] != 'w' || fields[1][3] != 'p' || (noExec && fields[1][2] == 'x') {
			continue
		}
		if len(fields) >= 6 && strings.HasPrefix(fields[5], "[v") { // [vvar], [vdso], [vsyscall]
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		s, err1 := strconv.ParseUint(lo, 16, 64)
		e, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, vma{s, e})
	}
	return out, sc.Err()
}

// Scan reads the present pages of the private writable mappings of the processes, without
// stopping them, and hands them to fn in chunks of at most chunkPages pages, in address
// order per process, each page with its hash. A process that exits meanwhile is
// skipped. fn must not keep the chunk's buffers.
func Scan(pids []int, chunkPages int, fn func(Chunk) error) error {
	hs := make([]Hash, max(chunkPages, 256))
	return ScanRaw(pids, chunkPages, false, func(ch Chunk) error {
		ch.Hashes = hs[:len(ch.Addrs)]
		SumAll(ch.Data, ch.Hashes)
		return fn(ch)
	})
}

// ScanRaw is Scan without the hashes (Chunk.Hashes is nil). With noExec it skips
// executable mappings: the only ones CRIU writes to in a process it dumps (its parasite's
// system calls are planted in one, then restored).
func ScanRaw(pids []int, chunkPages int, noExec bool, fn func(Chunk) error) error {
	return scanRaw(pids, chunkPages, chunkPages, noExec, Part{}, fn)
}

// Part is one of Of parts of a scan (ScanPart): the windows of address space, WindowPages
// pages each and aligned, whose number modulo Of is Index. The zero Part is the whole.
type Part struct{ Index, Of int }

// WindowPages is the size of a window of ScanPart: 2 MiB of address space.
const WindowPages = 512

// readPages is how much of a window ScanPart reads at once (256 KiB): a buffer that stays
// in the CPU's cache between the copy and the caller's hashing. Reading 512 MiB and
// fingerprinting it took 0.16 s in 2 MiB reads and 0.09 s in 256 KiB ones here (the
// frozen phase reads the whole memory; a 2 MiB buffer goes out to memory and back).
const readPages = 64

// ScanPart is ScanRaw of one part of the memory: several goroutines, each with its own
// part, scan it all between them, and every chunk lies in one aligned window of
// WindowPages pages (a chunk is a window's present pages, at most).
func ScanPart(pids []int, noExec bool, part Part, fn func(Chunk) error) error {
	if part.Of <= 0 || part.Index < 0 || part.Index >= part.Of {
		return fmt.Errorf("scan part %d of %d", part.Index, part.Of)
	}
	return scanRaw(pids, WindowPages, readPages, noExec, part, fn)
}

// scanRaw scans windows of chunkPages pages, reading and handing over at most
// readChunk pages of a window at once.
func scanRaw(pids []int, chunkPages, readChunk int, noExec bool, part Part, fn func(Chunk) error) error {
	if chunkPages <= 0 {
		chunkPages = 256
	}
	if readChunk <= 0 || readChunk > chunkPages {
		readChunk = chunkPages
	}
	buf := make([]byte, readChunk*Size)
	pm := make([]byte, chunkPages*8)
	addrs := make([]uint64, 0, readChunk)
	for _, pid := range pids {
		err := scanProcess(pid, noExec, part, chunkPages, buf, pm, addrs, fn)
		if err != nil && !exited(err) {
			return fmt.Errorf("read memory of process %d: %w", pid, err)
		}
	}
	return nil
}

// exited reports whether err says that the process is gone: its /proc directory went
// (ENOENT), or it was released between the lookup and the open (ESRCH, "no such
// process"; CI saw it for a container's short-lived shell child).
func exited(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

func scanProcess(pid int, noExec bool, part Part, chunkPages int, buf, pm []byte, addrs []uint64, fn func(Chunk) error) error {
	maps, err := writableMappings(pid, noExec)
	if err != nil {
		return err
	}
	nspid, err := NSPid(pid)
	if err != nil {
		return err
	}
	pagemap, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return err
	}
	defer pagemap.Close()
	mem, err := OpenProcMem(pid)
	if err != nil {
		return err
	}
	defer mem.Close()
	readChunk := len(buf) / Size
	window := uint64(chunkPages) * Size
	for _, m := range maps {
		for a, next := m.start, uint64(0); a < m.end; a = next {
			next = a + window
			if part.Of > 0 {
				// Aligned windows, this part's only.
				next = (a/window + 1) * window
				if int((a/window)%uint64(part.Of)) != part.Index {
					continue
				}
			}
			n := int((min(next, m.end) - a) / Size)
			if _, err := pagemap.ReadAt(pm[:n*8], int64(a/Size)*8); err != nil {
				break // the mapping went away
			}
			addrs = addrs[:0]
			out := 0
			flush := func() error {
				if out == 0 {
					return nil
				}
				err := fn(Chunk{PID: pid, NSPid: nspid, Addrs: addrs, Data: buf[:out*Size]})
				addrs, out = addrs[:0], 0
				return err
			}
			// Read runs of present pages at once, at most readChunk pages at a time.
			for i := 0; i < n; {
				if binary.LittleEndian.Uint64(pm[i*8:])&(1<<63) == 0 {
					i++
					continue
				}
				j := i + 1
				for j < n && j-i < readChunk-out && binary.LittleEndian.Uint64(pm[j*8:])&(1<<63) != 0 {
					j++
				}
				start := a + uint64(i)*Size
				got := mem.ReadAt(buf[out*Size:(out+j-i)*Size], int64(start))
				for k := 0; k < got/Size; k++ {
					addrs = append(addrs, start+uint64(k)*Size)
				}
				out += got / Size
				i = j
				if out == readChunk {
					if err := flush(); err != nil {
						return err
					}
				}
			}
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

// ProcMem reads a process's memory: by process_vm_readv, which copies a run of pages with
// one pinning (0.17 s/GiB here against 0.21 s/GiB through /proc/PID/mem, in 256 KiB reads
// of a 1 GiB process; the frozen phase reads the whole container), and where that stops
// short (a mapping without read permission: it does not force access) through the
// process's mem file, which does.
type ProcMem struct {
	pid  int
	file *os.File
}

// OpenProcMem opens process pid's memory.
func OpenProcMem(pid int) (*ProcMem, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return nil, err
	}
	return &ProcMem{pid: pid, file: f}, nil
}

// ReadAt reads whole pages from vaddr and returns how many bytes it read: fewer than
// asked where neither way can.
func (m *ProcMem) ReadAt(buf []byte, vaddr int64) int {
	if len(buf) == 0 {
		return 0
	}
	got := 0
	local := []unix.Iovec{{Base: &buf[0]}}
	local[0].SetLen(len(buf))
	remote := []unix.RemoteIovec{{Base: uintptr(vaddr), Len: len(buf)}}
	if n, err := unix.ProcessVMReadv(m.pid, local, remote, 0); err == nil {
		got = n / Size * Size
	}
	if got < len(buf) {
		n, _ := m.file.ReadAt(buf[got:], vaddr+int64(got))
		got += n / Size * Size
	}
	return got
}

// Close closes the process's mem file.
func (m *ProcMem) Close() error { return m.file.Close() }
