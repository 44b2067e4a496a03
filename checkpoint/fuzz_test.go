package checkpoint

import (
	"testing"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"google.golang.org/protobuf/proto"
)

// FuzzParseDumpStats: CRIU's stats-dump image arrives inside a checkpoint archive; a
// damaged one must be an error, never a panic (scripts/fuzz.sh).
func FuzzParseDumpStats(f *testing.F) {
	full := func() *stats.DumpStatsEntry {
		return &stats.DumpStatsEntry{FreezingTime: proto.Uint32(6000), FrozenTime: proto.Uint32(1000000),
			MemdumpTime: proto.Uint32(3), MemwriteTime: proto.Uint32(4), PagesScanned: proto.Uint64(5),
			PagesSkippedParent: proto.Uint64(0), PagesWritten: proto.Uint64(6), PagesLazy: proto.Uint64(0)}
	}
	f.Add(statsImage(f, full()))
	f.Add([]byte{})
	f.Add(make([]byte, 12))
	big := statsImage(f, full())
	big[8], big[9], big[10], big[11] = 0xff, 0xff, 0xff, 0xff // an entry size past the end
	f.Add(big)
	f.Fuzz(func(t *testing.T, in []byte) {
		if st, err := ParseDumpStats(in); err == nil && st == nil {
			t.Fatal("no error and no statistics")
		}
	})
}
