package pageserver

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// CRIU corks its page-server socket when it connects and never uncorks it: its closing
// request (24 bytes), and with it the end of the last pages, stay in the kernel until the
// cork's 200 ms ceiling (the probe timer, TCP_RTO_MIN, not tunable), while the container
// is frozen and CRIU waits for the answer. The page server clears TCP_CORK on CRIU's
// socket once its stream goes quiet: whatever CRIU wrote leaves at once. Nothing else
// changes: the bytes are CRIU's, sent in the order it wrote them, and the close is still
// answered only after BeforeClose. If the peer's socket cannot be found (another network
// namespace, no permission), the transfer is as before, 200 ms slower at its end.

// quietAfter is how long a read waits before the stream counts as quiet. CRIU's socket
// holds back at most one segment's worth: a stream that stops this long is either done
// (its close is corked) or busy elsewhere, and uncorking is harmless in both cases.
const quietAfter = 2 * time.Millisecond

// peerSocket is the sending socket of a loopback connection, in the process that owns it.
type peerSocket struct {
	pidfd int    // the owner's pidfd
	fd    int    // its descriptor number in the owner
	ino   uint64 // the socket's inode, checked again before use
}

// findPeer finds the process holding the other end of conn, a connection accepted on a
// loopback address of this network namespace.
func findPeer(conn *net.TCPConn) (*peerSocket, error) {
	remote, ok := conn.RemoteAddr().(*net.TCPAddr)
	if !ok || !remote.IP.IsLoopback() {
		return nil, fmt.Errorf("peer %v is not on loopback", conn.RemoteAddr())
	}
	local, ok := conn.LocalAddr().(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("local address %v is not TCP", conn.LocalAddr())
	}
	ino, err := socketInode(remote.Port, local.Port)
	if err != nil {
		return nil, err
	}
	target := "socket:[" + strconv.FormatUint(ino, 10) + "]"
	// CRIU first: its descriptors are few; every other process after.
	procs, err := filepath.Glob("/proc/[0-9]*")
	if err != nil {
		return nil, err
	}
	var first, rest []string
	for _, p := range procs {
		if c, _ := os.ReadFile(p + "/comm"); strings.TrimSpace(string(c)) == "criu" {
			first = append(first, p)
		} else {
			rest = append(rest, p)
		}
	}
	for _, p := range append(first, rest...) {
		fds, err := os.ReadDir(p + "/fd")
		if err != nil {
			continue // gone, or not ours to read
		}
		for _, e := range fds {
			if l, err := os.Readlink(p + "/fd/" + e.Name()); err != nil || l != target {
				continue
			}
			pid, err1 := strconv.Atoi(filepath.Base(p))
			fd, err2 := strconv.Atoi(e.Name())
			if err1 != nil || err2 != nil {
				continue
			}
			pidfd, err := unix.PidfdOpen(pid, 0)
			if err != nil {
				return nil, fmt.Errorf("pidfd of process %d: %w", pid, err)
			}
			return &peerSocket{pidfd: pidfd, fd: fd, ino: ino}, nil
		}
	}
	return nil, fmt.Errorf("no process holds the socket on port %d", remote.Port)
}

// socketInode reads the inode of the IPv4 TCP socket from local port port to remote
// port peer: the sender's end of this connection, not another socket on the same port.
func socketInode(port, peer int) (uint64, error) {
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	local, remote := fmt.Sprintf(":%04X", port), fmt.Sprintf(":%04X", peer)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 9 && strings.HasSuffix(fs[1], local) && strings.HasSuffix(fs[2], remote) {
			return strconv.ParseUint(fs[9], 10, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no TCP socket from local port %d to port %d", port, peer)
}

// uncork clears TCP_CORK on the peer's socket, through a duplicate of its descriptor
// (pidfd_getfd) that is closed again at once.
func (p *peerSocket) uncork() error {
	fd, err := unix.PidfdGetfd(p.pidfd, p.fd, 0)
	if err != nil {
		return fmt.Errorf("pidfd_getfd: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Ino != p.ino {
		return errors.New("the peer's descriptor is another socket now")
	}
	return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_CORK, 0)
}

func (p *peerSocket) close() { unix.Close(p.pidfd) }

// uncorker finds the peer in the background as soon as the connection is accepted (off
// the transfer's critical path) and uncorks it the first time the stream goes quiet.
type uncorker struct {
	conn   net.Conn
	report func(error) // told once whether the peer was uncorked
	found  chan struct{}
	peer   *peerSocket
	err    error
	once   sync.Once
	// settled: the uncork was tried (done: it worked); reads then just read.
	settled, done bool
}

func newUncorker(conn net.Conn, report func(error)) *uncorker {
	if report == nil {
		report = func(err error) {
			if err != nil {
				slog.Debug("page server: the dump's socket was not uncorked; its close waited for the kernel's cork timer", "why", err)
			}
		}
	}
	u := &uncorker{conn: conn, report: report, found: make(chan struct{})}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		u.err = errors.New("not a TCP connection")
		close(u.found)
		return u
	}
	go func() {
		defer close(u.found)
		u.peer, u.err = findPeer(tc)
	}()
	return u
}

// quiet is called when a read has waited quietAfter: uncork once, if the peer is known
// by then (if the lookup still runs, the next quiet read tries again).
func (u *uncorker) quiet() {
	select {
	case <-u.found:
	default:
		return
	}
	u.once.Do(func() {
		if u.err == nil {
			u.err = u.peer.uncork()
		}
		u.settled, u.done = true, u.err == nil
		u.report(u.err)
	})
}

// close releases the peer's pidfd; if no uncork was tried, it says why.
func (u *uncorker) close() {
	if !u.settled {
		select {
		case <-u.found:
			if u.err == nil {
				u.err = errors.New("the stream never went quiet")
			}
		default:
			u.err = errors.New("the peer's socket was still being looked for")
		}
		u.report(u.err)
	}
	go func() {
		<-u.found
		if u.peer != nil {
			u.peer.close()
		}
	}()
}

// Read reads from the connection. While the peer is not uncorked yet, a read that waits
// quietAfter tries to uncork it (once the lookup is done) and waits again.
func (u *uncorker) Read(b []byte) (int, error) {
	for !u.settled {
		u.conn.SetReadDeadline(time.Now().Add(quietAfter))
		n, err := u.conn.Read(b)
		if n > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return n, err
		}
		u.quiet()
		if u.settled {
			u.conn.SetReadDeadline(time.Time{})
		}
	}
	return u.conn.Read(b)
}

func (u *uncorker) Write(b []byte) (int, error) { return u.conn.Write(b) }
