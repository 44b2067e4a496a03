package testbed

import (
	"encoding/csv"
	"fmt"
	"io"
	"strconv"
	"time"
)

// ReadCSV reads rows that WriteCSV wrote (to merge runs and redraw the plot).
func ReadCSV(r io.Reader) ([]ExpRow, error) {
	recs, err := csv.NewReader(r).ReadAll()
	if err != nil {
		return nil, err
	}
	var rows []ExpRow
	for i, rec := range recs {
		if i == 0 {
			continue
		}
		if len(rec) < 10 {
			return nil, fmt.Errorf("line %d: %d fields, want 10", i+1, len(rec))
		}
		num := func(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n }
		pct, _ := strconv.ParseFloat(rec[1], 64)
		rows = append(rows, ExpRow{SizeMiB: int(num(rec[0])), DirtyPct: pct, Case: rec[2],
			Gap: time.Duration(num(rec[3])) * time.Millisecond, Held: time.Duration(num(rec[4])) * time.Millisecond,
			Total: time.Duration(num(rec[5])) * time.Millisecond, Bytes: num(rec[6]), Rounds: int(num(rec[7])),
			Replies: int(num(rec[8])), Phases: rec[9]})
	}
	return rows, nil
}
