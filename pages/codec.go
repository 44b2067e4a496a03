package pages

import (
	"archive/tar"
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync"
)

// Session is the ordered list of pages named during one migration. Both ends build the
// same list, in the same order: the source from what it announces and sends, the target
// from what it is told and receives. The final archive then names a page by its place in
// the list, and a run of pages by its first place and a count: a few bytes for what would
// otherwise be 32 bytes a page.
type Session struct {
	mu   sync.Mutex
	list []Hash
	pos  map[Hash]int
}

// NewSession returns an empty session.
func NewSession() *Session { return &Session{pos: map[Hash]int{}} }

// Fresh returns the hashes of hs that the session does not name yet, each once.
func (s *Session) Fresh(hs []Hash) []Hash {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Hash
	seen := map[Hash]bool{}
	for _, h := range hs {
		if _, ok := s.pos[h]; !ok && !seen[h] {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}

// Append adds hs to the list, in order, and returns the place of the first.
func (s *Session) Append(hs ...Hash) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	at := len(s.list)
	for i, h := range hs {
		if _, ok := s.pos[h]; !ok {
			s.pos[h] = at + i
		}
	}
	s.list = append(s.list, hs...)
	return at
}

// Index returns the place of h in the list.
func (s *Session) Index(h Hash) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ok := s.pos[h]
	return i, ok
}

// Slice returns the n hashes from place i.
func (s *Session) Slice(i, n int) ([]Hash, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i < 0 || n < 0 || i+n > len(s.list) {
		return nil, fmt.Errorf("pages %d..%d: the session names only %d pages", i, i+n, len(s.list))
	}
	return s.list[i : i+n], nil
}

// Len is the number of pages named.
func (s *Session) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.list)
}

// IsPageImage reports whether a name in a podman checkpoint archive is one of CRIU's page
// images (checkpoint/pages-N.img), which hold nothing but whole pages.
func IsPageImage(name string) bool {
	dir, base := path.Split(strings.TrimPrefix(name, "./"))
	return strings.TrimSuffix(dir, "/") == "checkpoint" && strings.HasPrefix(base, "pages-") && strings.HasSuffix(base, ".img")
}

// The encoded archive is a sequence of operations:
//
//	'R' n bytes   n raw bytes of the archive
//	'C' i n       the n pages at places i.. of the session
//	'P' n pages   n pages the receiver lacks
//	'E'           the end
const (
	opRaw   = 'R'
	opCopy  = 'C'
	opPages = 'P'
	opEnd   = 'E'
)

// Stats counts what an encoded archive carried.
type Stats struct {
	ArchiveBytes int64 `json:"archive_bytes"` // the archive as podman wrote it
	RawBytes     int64 `json:"raw_bytes"`     // sent as they are (headers, other images)
	PagesCopied  int64 `json:"pages_referenced"`
	PagesSent    int64 `json:"pages_sent"`
}

// switchTee copies what is read through it to a buffer while on.
type switchTee struct {
	r   io.Reader
	on  bool
	buf bytes.Buffer
	n   int64
}

func (t *switchTee) Read(b []byte) (int, error) {
	n, err := t.r.Read(b)
	t.n += int64(n)
	if t.on {
		t.buf.Write(b[:n])
	}
	return n, err
}

type opWriter struct {
	w   *bufio.Writer
	tmp [2 * binary.MaxVarintLen64]byte
}

func (o *opWriter) op(code byte, args ...uint64) error {
	o.w.WriteByte(code)
	for _, a := range args {
		n := binary.PutUvarint(o.tmp[:], a)
		if _, err := o.w.Write(o.tmp[:n]); err != nil {
			return err
		}
	}
	return nil
}

// Encode reads a checkpoint archive (tar) from src and writes it to dst with the pages of
// its page images replaced by session references where the session names them; pages it
// does not name are sent and added to the session. sent, if not nil, sees every page sent
// with its hash. The receiver's Decode rebuilds the archive byte for byte.
func Encode(src io.Reader, dst io.Writer, sess *Session, sent func(h []Hash, pages []byte)) (Stats, error) {
	var st Stats
	tee := &switchTee{r: src, on: true}
	tr := tar.NewReader(tee)
	ow := &opWriter{w: bufio.NewWriterSize(dst, 1<<20)}
	flushRaw := func() error {
		if tee.buf.Len() == 0 {
			return nil
		}
		st.RawBytes += int64(tee.buf.Len())
		if err := ow.op(opRaw, uint64(tee.buf.Len())); err != nil {
			return err
		}
		_, err := ow.w.Write(tee.buf.Bytes())
		tee.buf.Reset()
		return err
	}
	buf := make([]byte, 256*Size)
	hs := make([]Hash, 256)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return st, fmt.Errorf("read checkpoint archive: %w", err)
		}
		if hdr.Typeflag != tar.TypeReg || !IsPageImage(hdr.Name) || hdr.Size%Size != 0 {
			continue // its bytes go through the tee on the next read
		}
		if err := flushRaw(); err != nil {
			return st, err
		}
		tee.on = false
		for left := hdr.Size / Size; left > 0; {
			n := int(min(left, 256))
			if _, err := io.ReadFull(tr, buf[:n*Size]); err != nil {
				return st, fmt.Errorf("read %s: %w", hdr.Name, err)
			}
			left -= int64(n)
			SumAll(buf[:n*Size], hs[:n])
			for i := 0; i < n; {
				if at, ok := sess.Index(hs[i]); ok {
					j := i + 1
					for j < n {
						if k, ok := sess.Index(hs[j]); !ok || k != at+(j-i) {
							break
						}
						j++
					}
					if err := ow.op(opCopy, uint64(at), uint64(j-i)); err != nil {
						return st, err
					}
					st.PagesCopied += int64(j - i)
					i = j
					continue
				}
				// A run of pages the session does not name; each joins it as it is sent, so
				// a page repeated later in the archive is sent once.
				j := i
				for j < n {
					if _, ok := sess.Index(hs[j]); ok {
						break
					}
					sess.Append(hs[j])
					j++
				}
				if err := ow.op(opPages, uint64(j-i)); err != nil {
					return st, err
				}
				if _, err := ow.w.Write(buf[i*Size : j*Size]); err != nil {
					return st, err
				}
				if sent != nil {
					sent(hs[i:j], buf[i*Size:j*Size])
				}
				st.PagesSent += int64(j - i)
				i = j
			}
		}
		tee.on = true
	}
	// The rest: the archive's end blocks and any padding.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return st, fmt.Errorf("read checkpoint archive: %w", err)
	}
	if err := flushRaw(); err != nil {
		return st, err
	}
	st.ArchiveBytes = tee.n
	if err := ow.op(opEnd); err != nil {
		return st, err
	}
	return st, ow.w.Flush()
}

// Decode rebuilds an archive that Encode wrote from src into dst, reading referenced pages
// from store. Every page received joins the session and the store, under the hash this
// side computes.
func Decode(src io.Reader, dst io.Writer, sess *Session, store *Store) (Stats, error) {
	var st Stats
	br := bufio.NewReaderSize(src, 1<<20)
	buf := make([]byte, 256*Size)
	hs := make([]Hash, 256)
	arg := func() (int, error) {
		v, err := binary.ReadUvarint(br)
		if err != nil {
			return 0, fmt.Errorf("encoded archive: %w", noEOF(err))
		}
		if v > 1<<40 {
			return 0, fmt.Errorf("encoded archive: implausible count %d", v)
		}
		return int(v), nil
	}
	for {
		code, err := br.ReadByte()
		if err != nil {
			return st, fmt.Errorf("encoded archive: %w", noEOF(err))
		}
		switch code {
		case opEnd:
			return st, nil
		case opRaw:
			n, err := arg()
			if err != nil {
				return st, err
			}
			if _, err := io.CopyN(dst, br, int64(n)); err != nil {
				return st, fmt.Errorf("encoded archive: %w", noEOF(err))
			}
			st.RawBytes += int64(n)
			st.ArchiveBytes += int64(n)
		case opCopy:
			at, err := arg()
			if err != nil {
				return st, err
			}
			n, err := arg()
			if err != nil {
				return st, err
			}
			for n > 0 {
				k := min(n, 256)
				names, err := sess.Slice(at, k)
				if err != nil {
					return st, err
				}
				if err := store.Read(names, buf[:k*Size]); err != nil {
					return st, err
				}
				if _, err := dst.Write(buf[:k*Size]); err != nil {
					return st, err
				}
				st.PagesCopied += int64(k)
				st.ArchiveBytes += int64(k) * Size
				at += k
				n -= k
			}
		case opPages:
			n, err := arg()
			if err != nil {
				return st, err
			}
			for n > 0 {
				k := min(n, 256)
				if _, err := io.ReadFull(br, buf[:k*Size]); err != nil {
					return st, fmt.Errorf("encoded archive: %w", noEOF(err))
				}
				SumAll(buf[:k*Size], hs[:k])
				sess.Append(hs[:k]...)
				if err := store.AddTrusted(hs[:k], buf[:k*Size]); err != nil {
					return st, err
				}
				if _, err := dst.Write(buf[:k*Size]); err != nil {
					return st, err
				}
				st.PagesSent += int64(k)
				st.ArchiveBytes += int64(k) * Size
				n -= k
			}
		default:
			return st, fmt.Errorf("encoded archive: unknown operation %q", code)
		}
	}
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
