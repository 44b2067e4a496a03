// Package pages moves memory by content: every 4 KiB page is named by its SHA-256, a
// page store keeps pages by that name (deduplicated across rounds, containers and
// migrations), a scanner reads a running container's memory without dirty tracking, and a
// codec sends a CRIU checkpoint archive as references to pages the receiver already holds
// plus the pages it lacks.
package pages

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"runtime"
	"sync"

	"github.com/zeebo/xxh3"
)

// Size is the page size CRIU's page images are made of.
const Size = 4096

// Hash names a page by its content.
type Hash [sha256.Size]byte

func (h Hash) String() string { return hex.EncodeToString(h[:8]) }

// Sum returns the name of one page.
func Sum(page []byte) Hash { return sha256.Sum256(page) }

// SumAll fills out[i] with the hash of the i-th page of buf, on all CPUs when buf is large
// enough to pay for it. len(buf) must be len(out)*Size.
func SumAll(buf []byte, out []Hash) { sumPages(buf, out, nil) }

// SumSome fills out[i] for each i of idx with the hash of the i-th page of buf; the
// other entries of out stay as they are.
func SumSome(buf []byte, out []Hash, idx []int) {
	if len(idx) > 0 {
		sumPages(buf, out, idx)
	}
}

// sumPages hashes the pages of buf named by idx (all of them if idx is nil; none if it is
// empty) into out, on all CPUs when there are enough of them.
func sumPages(buf []byte, out []Hash, idx []int) {
	n := len(idx)
	if idx == nil {
		n = len(out)
	}
	page := func(k int) int {
		if idx == nil {
			return k
		}
		return idx[k]
	}
	sum := func(lo, hi int) {
		for k := lo; k < hi; k++ {
			i := page(k)
			out[i] = sha256.Sum256(buf[i*Size : (i+1)*Size])
		}
	}
	workers := min(runtime.GOMAXPROCS(0), n/32)
	if n < 64 || workers <= 1 {
		sum(0, n)
		return
	}
	var wg sync.WaitGroup
	per := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += per {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			sum(lo, hi)
		}(lo, min(lo+per, n))
	}
	wg.Wait()
}

// AppendHashes appends hs as a list of hashes on the wire (32 bytes each).
func AppendHashes(dst []byte, hs []Hash) []byte {
	for _, h := range hs {
		dst = append(dst, h[:]...)
	}
	return dst
}

// ParseHashes reads a list AppendHashes wrote.
func ParseHashes(b []byte) ([]Hash, error) {
	if len(b)%len(Hash{}) != 0 {
		return nil, fmt.Errorf("%d bytes is not a list of SHA-256 hashes", len(b))
	}
	hs := make([]Hash, len(b)/len(Hash{}))
	for i := range hs {
		copy(hs[i][:], b[i*len(Hash{}):])
	}
	return hs, nil
}

// Fast is a page's quick fingerprint: XXH3's 128-bit hash under a seed chosen at random
// when the process starts (about 30 GB/s here, against 4.7 GB/s for two hash/maphash
// sums: the frozen phase fingerprints the whole memory). It is no name: it only tells
// whether the content at an address is still what it was when this process last read
// it, so that the page's SHA-256 computed then can be used again without hashing it
// anew. Equal fingerprints of different contents happen with probability 2^-128, and the
// seed is secret, so content is not made to collide by chance of its layout; a container
// that tried to on purpose could only damage its own memory.
type Fast [2]uint64

var fastSeed = func() uint64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return binary.LittleEndian.Uint64(b[:])
}()

// FastSum fingerprints one page.
func FastSum(page []byte) Fast {
	h := xxh3.Hash128Seed(page, fastSeed)
	return Fast{h.Lo, h.Hi}
}
