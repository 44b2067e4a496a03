package pages

import (
	"encoding/binary"
	"os"
	"os/exec"
	"reflect"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Pre-copy reads processes that run on; one that is gone by the time its memory is read
// (its /proc entry gone, or released as it was opened: ESRCH) is skipped, not an error
// that rolls the move back. Any other error still is one.
func TestScanSkipsProcessesThatExited(t *testing.T) {
	live := exec.Command("sleep", "30")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { live.Process.Kill(); live.Wait() }()
	gone := exec.Command("true")
	if err := gone.Run(); err != nil { // reaped: its PID names nothing now
		t.Fatal(err)
	}
	seen := map[int]int{}
	err := Scan([]int{gone.Process.Pid, live.Process.Pid}, 64, func(ch Chunk) error {
		seen[ch.PID] += len(ch.Addrs)
		return nil
	})
	if err != nil || seen[live.Process.Pid] == 0 || seen[gone.Process.Pid] != 0 {
		t.Fatalf("scan: %v; pages read %v: want the live process's and none of the exited one", err, seen)
	}
	for _, c := range []struct {
		err  error
		gone bool
	}{
		{&os.PathError{Op: "open", Path: "/proc/1475/mem", Err: syscall.ESRCH}, true},
		{&os.PathError{Op: "open", Path: "/proc/1475/maps", Err: syscall.ENOENT}, true},
		{&os.PathError{Op: "open", Path: "/proc/1475/mem", Err: syscall.EACCES}, false},
	} {
		if exited(c.err) != c.gone {
			t.Errorf("exited(%v) = %v, want %v", c.err, !c.gone, c.gone)
		}
	}
}

// The parts of a scan cover between them what the whole scan does, each page once and
// with its bytes, every chunk inside one aligned window: the frozen phase names a
// container's memory with several goroutines, each keeping the names of its own windows.
func TestScanPartsCoverTheWholeOnce(t *testing.T) {
	const n = 3*WindowPages + 77 // not aligned, spans four or five windows
	mem, err := unix.Mmap(-1, 0, n*Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	for i := 0; i < n; i++ {
		if i%5 != 3 { // some pages never touched: not present, not read
			binary.LittleEndian.PutUint64(mem[i*Size:], uint64(i)*0x9E3779B97F4A7C15+1)
		}
	}
	lo := uint64(uintptr(unsafe.Pointer(&mem[0])))
	hi := lo + n*Size
	pid := os.Getpid()
	collect := func(scan func(fn func(Chunk) error) error) map[uint64]Hash {
		got := map[uint64]Hash{}
		err := scan(func(ch Chunk) error {
			for i, a := range ch.Addrs {
				if a < lo || a >= hi {
					continue
				}
				if _, dup := got[a]; dup {
					t.Errorf("page %#x read twice", a)
				}
				got[a] = Sum(ch.Data[i*Size : (i+1)*Size])
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	whole := collect(func(fn func(Chunk) error) error { return ScanRaw([]int{pid}, 256, true, fn) })
	if want := n - (n+1)/5; len(whole) != want {
		t.Fatalf("the whole scan read %d pages of the mapping, want the %d present", len(whole), want)
	}
	const of = 3
	parts := map[uint64]Hash{}
	for i := 0; i < of; i++ {
		got := collect(func(fn func(Chunk) error) error {
			return ScanPart([]int{pid}, true, Part{Index: i, Of: of}, func(ch Chunk) error {
				first, last := ch.Addrs[0]/(WindowPages*Size), ch.Addrs[len(ch.Addrs)-1]/(WindowPages*Size)
				if first != last || int(first%of) != i {
					t.Errorf("part %d: a chunk from %#x to %#x, not inside one of its windows", i, ch.Addrs[0], ch.Addrs[len(ch.Addrs)-1])
				}
				if len(ch.Addrs) > readPages {
					t.Errorf("part %d: a chunk of %d pages, over the %d read at once", i, len(ch.Addrs), readPages)
				}
				return fn(ch)
			})
		})
		for a, h := range got {
			if _, dup := parts[a]; dup {
				t.Errorf("page %#x in two parts", a)
			}
			parts[a] = h
		}
	}
	if !reflect.DeepEqual(parts, whole) {
		t.Errorf("the parts read %d pages, the whole %d: not the same pages and bytes", len(parts), len(whole))
	}
	if err := ScanPart([]int{pid}, true, Part{Index: 3, Of: 3}, func(Chunk) error { return nil }); err == nil {
		t.Error("part 3 of 3: no error")
	}
}
