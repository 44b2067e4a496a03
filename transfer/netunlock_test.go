package transfer

import (
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/crit/images/fdinfo"
	sk_inet "github.com/checkpoint-restore/go-criu/v7/crit/images/sk-inet"
	sk_opts "github.com/checkpoint-restore/go-criu/v7/crit/images/sk-opts"
	"github.com/checkpoint-restore/go-criu/v7/magic"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/migrate-project/migrate/internal/testenv"
)

// filesImage builds a CRIU files.img holding inet sockets with the given SO_REUSEADDR.
func filesImage(t *testing.T, reuse map[uint32]bool) []byte {
	t.Helper()
	m := magic.LoadMagic()
	img := binary.LittleEndian.AppendUint32(nil, uint32(m.ByName["IMG_COMMON"]))
	img = binary.LittleEndian.AppendUint32(img, uint32(m.ByName["FILES"]))
	id := uint32(1)
	for ino, r := range reuse {
		typ := fdinfo.FdTypes_INETSK
		e := &fdinfo.FileEntry{Type: &typ, Id: proto.Uint32(id), Isk: &sk_inet.InetSkEntry{Id: proto.Uint32(id), Ino: proto.Uint32(ino),
			Family: proto.Uint32(2), Type: proto.Uint32(1), Proto: proto.Uint32(6), State: proto.Uint32(1), SrcPort: proto.Uint32(7000),
			DstPort: proto.Uint32(1), Flags: proto.Uint32(2), Backlog: proto.Uint32(0),
			Fown: nil, Opts: &sk_opts.SkOptsEntry{SoSndbuf: proto.Uint32(0), SoRcvbuf: proto.Uint32(0), SoSndTmoSec: proto.Uint64(0),
				SoSndTmoUsec: proto.Uint64(0), SoRcvTmoSec: proto.Uint64(0), SoRcvTmoUsec: proto.Uint64(0), Reuseaddr: proto.Bool(r)}}}
		b, err := proto.MarshalOptions{AllowPartial: true}.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		img = binary.LittleEndian.AppendUint32(img, uint32(len(b)))
		img = append(img, b...)
		id++
	}
	return img
}

func TestDumpedReuseAddrReadsCRIUsFilesImage(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "files.img")
	if err := os.WriteFile(f, filesImage(t, map[uint32]bool{100: true, 200: false}), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := dumpedReuseAddr(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !got[100] || got[200] {
		t.Fatalf("dumpedReuseAddr = %v, want 100: true, 200: false", got)
	}
	// Damaged images fail, they do not panic.
	img, _ := os.ReadFile(f)
	for _, cut := range []int{0, 3, 7, 9, len(img) - 1} {
		os.WriteFile(f, img[:cut], 0o600)
		if _, err := dumpedReuseAddr(f); err == nil {
			t.Errorf("files.img cut to %d bytes: no error", cut)
		}
	}
	if _, err := dumpedReuseAddr(filepath.Join(dir, "none.img")); err == nil {
		t.Error("no files.img: no error")
	}
}

// A socket that leaves repair mode loses SO_REUSEADDR in the kernel; repairOff gives it
// back what the dump recorded (or sets it where nothing was recorded), as CRIU does.
// Without that, a connection closed from this side sits a minute in TIME_WAIT without
// it and a restore of the listening socket on its port fails.
func TestRepairOffGivesSocketsBackTheirReuseAddr(t *testing.T) {
	testenv.Need(t, os.Geteuid() == 0, "TCP_REPAIR needs CAP_NET_ADMIN (root)")
	ln, err := net.Listen("tcp", "127.0.0.1:0") // Go sets SO_REUSEADDR on listeners
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns []*net.TCPConn
	for i := 0; i < 2; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		conns = append(conns, s.(*net.TCPConn))
	}
	opt := func(c *net.TCPConn, level, name int) int {
		raw, _ := c.SyscallConn()
		v := -1
		raw.Control(func(fd uintptr) { v, _ = unix.GetsockoptInt(int(fd), level, name) })
		return v
	}
	set := func(c *net.TCPConn, level, name, v int) {
		raw, _ := c.SyscallConn()
		var serr error
		raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, name, v) })
		if serr != nil {
			t.Fatal(serr)
		}
	}
	inode := func(c *net.TCPConn) uint64 {
		f, err := c.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		l, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(f.Fd())))
		if err != nil {
			t.Fatal(err)
		}
		n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]"), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	// The first as a dump recorded it (no SO_REUSEADDR), the second not recorded.
	reuse := map[uint64]bool{inode(conns[0]): false}
	for _, c := range conns {
		set(c, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1)
	}
	n, err := repairOff(os.Getpid(), reuse)
	if err != nil {
		t.Fatal(err)
	}
	if n < 2 {
		t.Fatalf("repairOff took %d sockets out of repair mode, want at least 2", n)
	}
	for i, want := range []int{0, 1} {
		if r := opt(conns[i], unix.IPPROTO_TCP, unix.TCP_REPAIR); r != 0 {
			t.Errorf("socket %d still in repair mode", i)
		}
		if got := opt(conns[i], unix.SOL_SOCKET, unix.SO_REUSEADDR); got != want {
			t.Errorf("socket %d: SO_REUSEADDR %d after repairOff, want %d", i, got, want)
		}
	}
}
