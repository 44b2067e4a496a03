package testbed

import (
	"encoding/csv"
	"fmt"
	"io"
	"os"
	"path/filepath"
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
		if len(rec) > 10 {
			rows[len(rows)-1].Postcopy = time.Duration(num(rec[10])) * time.Millisecond
		}
		if len(rec) > 11 {
			rows[len(rows)-1].OwnBytes = num(rec[11])
		}
		if len(rec) > 13 {
			rows[len(rows)-1].AfterP99 = time.Duration(num(rec[12])) * time.Microsecond
			rows[len(rows)-1].BeforeP99 = time.Duration(num(rec[13])) * time.Microsecond
		}
		if len(rec) > 14 {
			rows[len(rows)-1].Workload = rec[14]
		}
	}
	return rows, nil
}

// MergeRows merges runs of the experiment: a later run's row replaces an earlier row of
// the same configuration and case (a configuration measured again), in the earlier place;
// new rows keep their order.
func MergeRows(runs ...[]ExpRow) []ExpRow {
	type rowID struct {
		config
		c string
	}
	var out []ExpRow
	at := map[rowID]int{}
	for _, rows := range runs {
		for _, r := range rows {
			k := rowID{r.config(), r.Case}
			if i, ok := at[k]; ok {
				out[i] = r
				continue
			}
			at[k] = len(out)
			out = append(out, r)
		}
	}
	return out
}

// WriteReport writes experiment.csv and experiment.svg of the rows into dir.
func WriteReport(dir string, rows []ExpRow) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "experiment.csv"), rows, WriteCSV); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, "experiment.svg"), rows, WriteSVG)
}

func writeFile(name string, rows []ExpRow, write func(io.Writer, []ExpRow) error) error {
	f, err := os.Create(name)
	if err != nil {
		return err
	}
	if err := write(f, rows); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", name, err)
	}
	return f.Close()
}
