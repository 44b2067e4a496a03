package checkpoint

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"google.golang.org/protobuf/proto"
)

// statsImage writes a stats-dump image the way CRIU does: two magics, a size, the entry.
func statsImage(t testing.TB, d *stats.DumpStatsEntry) []byte {
	payload, err := proto.Marshal(&stats.StatsEntry{Dump: d})
	if err != nil {
		t.Fatal(err)
	}
	img := binary.LittleEndian.AppendUint32(nil, stats.ImgServiceMagic)
	img = binary.LittleEndian.AppendUint32(img, stats.StatsMagic)
	img = binary.LittleEndian.AppendUint32(img, uint32(len(payload)))
	return append(img, payload...)
}

func TestParseDumpStatsReadsCRIUsOwnTimes(t *testing.T) {
	u32 := func(v uint32) *uint32 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	img := statsImage(t, &stats.DumpStatsEntry{FreezingTime: u32(1500), FrozenTime: u32(820000),
		MemdumpTime: u32(300000), MemwriteTime: u32(400000), PagesScanned: u64(70000),
		PagesSkippedParent: u64(0), PagesWritten: u64(65600), PagesLazy: u64(0)})
	got, err := ParseDumpStats(img)
	if err != nil {
		t.Fatal(err)
	}
	want := DumpStats{Freezing: 1500 * time.Microsecond, Frozen: 820 * time.Millisecond, MemDump: 300 * time.Millisecond,
		MemWrite: 400 * time.Millisecond, PagesWritten: 65600, PagesScanned: 70000}
	if *got != want {
		t.Fatalf("got %+v, want %+v", *got, want)
	}

	bad := append([]byte{}, img...)
	bad[4] ^= 0xff
	for name, b := range map[string][]byte{"short": img[:8], "wrong magic": bad, "truncated entry": img[:len(img)-3]} {
		if _, err := ParseDumpStats(b); err == nil {
			t.Errorf("%s: parsed without error", name)
		}
	}
}
