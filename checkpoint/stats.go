package checkpoint

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"google.golang.org/protobuf/proto"
)

// DumpStatsFile is the base name of CRIU's dump statistics image in a checkpoint archive.
const DumpStatsFile = stats.StatsDump

// DumpStats is what CRIU measured of its own dump: where the frozen time inside CRIU went.
type DumpStats struct {
	Freezing     time.Duration // stopping the process tree
	Frozen       time.Duration // from frozen to the end of the dump
	MemDump      time.Duration // draining pages from the processes (CRIU's own counter)
	MemWrite     time.Duration // writing them to the page images (CRIU's own counter)
	PagesWritten uint64        // pages in the page images
	PagesScanned uint64        // pages CRIU looked at
}

// ParseDumpStats decodes CRIU's stats-dump image (as found in a checkpoint archive).
// go-criu's stats package reads it from a directory only; the archive streams by.
func ParseDumpStats(img []byte) (*DumpStats, error) {
	if len(img) < stats.PayloadOffset {
		return nil, fmt.Errorf("%s: %d bytes, too short for CRIU's image header", DumpStatsFile, len(img))
	}
	if m := binary.LittleEndian.Uint32(img[stats.PrimaryMagicOffset:]); m != stats.ImgServiceMagic {
		return nil, fmt.Errorf("%s: magic %#x, not a CRIU service image", DumpStatsFile, m)
	}
	if m := binary.LittleEndian.Uint32(img[stats.SecondaryMagicOffset:]); m != stats.StatsMagic {
		return nil, fmt.Errorf("%s: magic %#x, not a statistics image", DumpStatsFile, m)
	}
	size := int(binary.LittleEndian.Uint32(img[stats.SizeOffset:]))
	if size > len(img)-stats.PayloadOffset {
		return nil, fmt.Errorf("%s: entry of %d bytes in a %d-byte image", DumpStatsFile, size, len(img))
	}
	var st stats.StatsEntry
	if err := proto.Unmarshal(img[stats.PayloadOffset:stats.PayloadOffset+size], &st); err != nil {
		return nil, fmt.Errorf("%s: %w", DumpStatsFile, err)
	}
	d := st.GetDump()
	if d == nil {
		return nil, fmt.Errorf("%s: no dump entry", DumpStatsFile)
	}
	us := func(v uint32) time.Duration { return time.Duration(v) * time.Microsecond }
	return &DumpStats{Freezing: us(d.GetFreezingTime()), Frozen: us(d.GetFrozenTime()),
		MemDump: us(d.GetMemdumpTime()), MemWrite: us(d.GetMemwriteTime()),
		PagesWritten: d.GetPagesWritten(), PagesScanned: d.GetPagesScanned()}, nil
}
