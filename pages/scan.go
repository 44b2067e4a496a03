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
	if chunkPages <= 0 {
		chunkPages = 256
	}
	buf := make([]byte, chunkPages*Size)
	pm := make([]byte, chunkPages*8)
	addrs := make([]uint64, 0, chunkPages)
	for _, pid := range pids {
		err := scanProcess(pid, noExec, buf, pm, addrs, fn)
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

func scanProcess(pid int, noExec bool, buf, pm []byte, addrs []uint64, fn func(Chunk) error) error {
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
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return err
	}
	defer mem.Close()
	chunkPages := len(buf) / Size
	for _, m := range maps {
		for a := m.start; a < m.end; a += uint64(chunkPages) * Size {
			n := int(min((m.end-a)/Size, uint64(chunkPages)))
			if _, err := pagemap.ReadAt(pm[:n*8], int64(a/Size)*8); err != nil {
				break // the mapping went away
			}
			addrs = addrs[:0]
			out := 0
			// Read runs of present pages at once.
			for i := 0; i < n; {
				if binary.LittleEndian.Uint64(pm[i*8:])&(1<<63) == 0 {
					i++
					continue
				}
				j := i + 1
				for j < n && binary.LittleEndian.Uint64(pm[j*8:])&(1<<63) != 0 {
					j++
				}
				start := a + uint64(i)*Size
				got, _ := mem.ReadAt(buf[out*Size:(out+j-i)*Size], int64(start))
				for k := 0; k < got/Size; k++ {
					addrs = append(addrs, start+uint64(k)*Size)
				}
				out += got / Size
				i = j
			}
			if out > 0 {
				if err := fn(Chunk{PID: pid, NSPid: nspid, Addrs: addrs, Data: buf[:out*Size]}); err != nil {
					return err
				}
			}
		}
	}
	return nil
}
