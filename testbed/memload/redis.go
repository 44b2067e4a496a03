package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// A Redis client for the service tests, speaking RESP on one connection: -redis-incr
// counts acknowledged INCRs of a key for a while (a broken connection is a failure: the
// move must keep it); -redis-cmd sends one command and prints the reply.

// dialRetry connects, retrying while the server starts (at most wait).
func dialRetry(addr string, wait time.Duration) (net.Conn, error) {
	deadline := time.Now().Add(wait)
	for {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func respCommand(args ...string) []byte {
	b := []byte(fmt.Sprintf("*%d\r\n", len(args)))
	for _, a := range args {
		b = append(b, fmt.Sprintf("$%d\r\n%s\r\n", len(a), a)...)
	}
	return b
}

// respReply reads one reply: an integer, a simple or bulk string, or an error.
func respReply(r *bufio.Reader) (string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", errors.New("empty reply")
	}
	switch line[0] {
	case ':', '+':
		return line[1:], nil
	case '-':
		return "", fmt.Errorf("redis: %s", line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n > 64<<20 {
			return "", fmt.Errorf("bad bulk length %q", line)
		}
		if n < 0 {
			return "(nil)", nil
		}
		buf := make([]byte, n+2)
		if _, err := ioReadFull(r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return "", fmt.Errorf("unexpected reply %q", line)
}

func ioReadFull(r *bufio.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := r.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// redisIncr INCRs key on one connection for d and prints how many were acknowledged,
// the last value acknowledged and the longest wait for a reply.
func redisIncr(addr, key string, d time.Duration) error {
	c, err := dialRetry(addr, 20*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	cmd := respCommand("INCR", key)
	var acked, last int64
	var maxWait time.Duration
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		t0 := time.Now()
		c.SetDeadline(t0.Add(30 * time.Second))
		if _, err := c.Write(cmd); err != nil {
			fmt.Printf("redis-incr acked=%d last=%d max_wait_ms=%d\n", acked, last, maxWait.Milliseconds())
			return fmt.Errorf("after %d acknowledged INCRs: %w", acked, err)
		}
		rep, err := respReply(r)
		if err != nil {
			fmt.Printf("redis-incr acked=%d last=%d max_wait_ms=%d\n", acked, last, maxWait.Milliseconds())
			return fmt.Errorf("after %d acknowledged INCRs: %w", acked, err)
		}
		v, err := strconv.ParseInt(rep, 10, 64)
		if err != nil || (acked > 0 && v != last+1) {
			return fmt.Errorf("INCR answered %q after %d", rep, last)
		}
		last = v
		acked++
		maxWait = max(maxWait, time.Since(t0))
		time.Sleep(2 * time.Millisecond)
	}
	fmt.Printf("redis-incr acked=%d last=%d max_wait_ms=%d\n", acked, last, maxWait.Milliseconds())
	return nil
}

// redisCmd sends one command and prints its reply.
func redisCmd(addr string, args []string) error {
	c, err := dialRetry(addr, 20*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write(respCommand(args...)); err != nil {
		return err
	}
	rep, err := respReply(bufio.NewReader(c))
	if err != nil {
		return err
	}
	fmt.Println(rep)
	return nil
}
