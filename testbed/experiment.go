package testbed

import (
	"cmp"
	"encoding/csv"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Cases of the downtime experiment.
const (
	CaseStock    = "stock"     // podman checkpoint --export, copy, podman restore --import
	CaseStopCopy = "stop-copy" // migrate push --mode stop-copy
	CasePrecopy  = "precopy"   // migrate push --handover page-server: pre-copy, the memory path (page server, lazy restore)
	// CasePrecopyRead is the memory path with the frozen memory read by the agent from
	// the processes of a lazy dump and the target restoring early (push --handover read,
	// the default since 2026-12-06; before, the page server was, as "precopy").
	CasePrecopyRead = "precopy-read"
	// CasePrecopyArchive is pre-copy with the pages inside podman's archive (the path
	// before the memory path, and the fallback).
	CasePrecopyArchive = "precopy-archive"
	// CasePostcopy is push --postcopy: pre-copy rounds, then the container resumes on
	// the target before the pages changed meanwhile have crossed.
	CasePostcopy = "postcopy"
)

// Cases are the experiment's cases, in the order they run; AllCases adds those run only
// when asked for (MIGRATE_EXPERIMENT_CASES).
var (
	Cases    = []string{CaseStock, CaseStopCopy, CasePrecopyArchive, CasePrecopy, CasePostcopy}
	AllCases = []string{CaseStock, CaseStopCopy, CasePrecopyArchive, CasePrecopyRead, CasePrecopy, CasePostcopy}
)

// ExpRow is one move of the experiment.
type ExpRow struct {
	SizeMiB  int           `json:"size_mib"`
	DirtyPct float64       `json:"dirty_pct_per_s"`
	Case     string        `json:"case"`
	Gap      time.Duration `json:"downtime_ns"` // largest gap the sockperf client saw
	Held     time.Duration `json:"held_ns"`     // traffic held (push) or checkpoint..re-point (stock)
	Total    time.Duration `json:"total_ns"`
	Bytes    int64         `json:"wire_bytes"` // entered the target's link, counted by the wire
	OwnBytes int64         `json:"own_bytes"`  // what the mover says it sent
	Rounds   int           `json:"rounds"`
	Replies  int           `json:"replies"`
	Phases   string        `json:"phases"` // the frozen phase, step by step
	// Postcopy is the post-copy phase's length (postcopy only).
	Postcopy time.Duration `json:"postcopy_ns,omitempty"`
	// AfterP99 is the 99th percentile of the client's round trips sent in the window
	// after the largest gap: the post-copy phase (postcopy), else the first second;
	// BeforeP99 of the same window before the gap.
	AfterP99  time.Duration `json:"after_p99_ns,omitempty"`
	BeforeP99 time.Duration `json:"before_p99_ns,omitempty"`
	// Workload names a workload other than memload (e.g. "redis 1000000 keys"), whose
	// SizeMiB is its resident memory before the move and DirtyPct 0.
	Workload string `json:"workload,omitempty"`
}

// AfterWindow is the window after the largest gap whose latency the experiment reports.
func AfterWindow(r ExpRow) time.Duration {
	if r.Case == CasePostcopy && r.Postcopy > 0 {
		return r.Postcopy
	}
	return time.Second
}

// config is one configuration of the experiment: a memory size and a dirty rate, or
// another workload.
type config struct {
	sizeMiB  int
	dirtyPct float64
	workload string
}

func (r ExpRow) config() config { return config{r.SizeMiB, r.DirtyPct, r.Workload} }

// Config names the row's configuration, as the ratio lines do.
func (r ExpRow) Config() string { return r.config().String() }

func (c config) size() string {
	if c.workload != "" {
		return c.workload
	}
	return fmt.Sprintf("%d MiB", c.sizeMiB)
}

func (c config) rate() string {
	if c.workload != "" {
		return fmt.Sprintf("%d MiB RSS", c.sizeMiB)
	}
	return fmt.Sprintf("%g%%/s", c.dirtyPct)
}

func (c config) String() string {
	if c.workload != "" {
		return fmt.Sprintf("%s (%s)", c.size(), c.rate())
	}
	return c.size() + " " + c.rate()
}

// byConfig groups rows by configuration, in the order first seen, and by case within one;
// a later row of the same configuration and case replaces an earlier one.
func byConfig(rows []ExpRow) ([]config, map[config]map[string]ExpRow) {
	var order []config
	by := map[config]map[string]ExpRow{}
	for _, r := range rows {
		k := r.config()
		if by[k] == nil {
			by[k] = map[string]ExpRow{}
			order = append(order, k)
		}
		by[k][r.Case] = r
	}
	return order, by
}

// WriteCSV writes the rows with a header.
func WriteCSV(w io.Writer, rows []ExpRow) error {
	cw := csv.NewWriter(w)
	cw.Write([]string{"size_mib", "dirty_pct_per_s", "case", "downtime_ms", "held_ms", "total_ms", "wire_bytes", "rounds", "replies", "frozen_phases", "postcopy_ms", "own_bytes", "after_p99_us", "before_p99_us", "workload"})
	ms := func(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) }
	for _, r := range rows {
		cw.Write([]string{strconv.Itoa(r.SizeMiB), strconv.FormatFloat(r.DirtyPct, 'g', -1, 64), r.Case, ms(r.Gap), ms(r.Held), ms(r.Total),
			strconv.FormatInt(r.Bytes, 10), strconv.Itoa(r.Rounds), strconv.Itoa(r.Replies), r.Phases, ms(r.Postcopy), strconv.FormatInt(r.OwnBytes, 10),
			strconv.FormatInt(r.AfterP99.Microseconds(), 10), strconv.FormatInt(r.BeforeP99.Microseconds(), 10), r.Workload})
	}
	cw.Flush()
	return cw.Error()
}

// OrderingNoise is how far apart two downtimes at the frozen phase's floor may land
// on this kind of machine from run to run (podman and CRIU on two shared CPUs; CI saw a
// 15 MiB Redis frozen 628 ms by stop-and-copy and 731 ms by pre-copy). Where a move's
// memory crosses in well under a second, pre-copy has nothing to gain and the two
// cases are ordered by noise, not by design.
const OrderingNoise = 300 * time.Millisecond

// HalvingFrom is the stop-and-copy downtime from which pre-copy must at least halve it:
// there the memory's crossing, which pre-copy moves out of the frozen phase, dominates.
const HalvingFrom = 2 * time.Second

// CheckOrdering checks the experiment's headline in every configuration that has the
// cases: where stop-and-copy's downtime is over HalvingFrom (its memory takes time to
// cross), pre-copy's is below half of it; pre-copy's is never above
// stop-and-copy's by more than OrderingNoise, nor stop-and-copy's above stock's.
func CheckOrdering(rows []ExpRow) error {
	keys, by := byConfig(rows)
	var errs []string
	for _, k := range keys {
		p, okp := by[k][CasePrecopy]
		sc, oks := by[k][CaseStopCopy]
		st, okt := by[k][CaseStock]
		if okp && oks {
			if sc.Gap > HalvingFrom && 2*p.Gap >= sc.Gap {
				errs = append(errs, fmt.Sprintf("%s: pre-copy's downtime %s is not below half of stop-and-copy's %s", k, p.Gap.Round(time.Millisecond), sc.Gap.Round(time.Millisecond)))
			} else if p.Gap > sc.Gap+OrderingNoise {
				errs = append(errs, fmt.Sprintf("%s: pre-copy's downtime %s exceeds stop-and-copy's %s by more than %s", k, p.Gap.Round(time.Millisecond), sc.Gap.Round(time.Millisecond), OrderingNoise))
			}
		}
		if oks && okt && sc.Gap > st.Gap+OrderingNoise {
			errs = append(errs, fmt.Sprintf("%s: stop-and-copy's downtime %s exceeds the stock sequence's %s by more than %s", k, sc.Gap.Round(time.Millisecond), st.Gap.Round(time.Millisecond), OrderingNoise))
		}
		for c, r := range by[k] {
			if r.Gap <= 0 || r.Bytes <= 0 || r.Total <= 0 {
				errs = append(errs, fmt.Sprintf("%s %s: not measured (downtime %s, bytes %d, total %s)", k, c, r.Gap, r.Bytes, r.Total))
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("experiment: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Ratios returns one line per configuration: pre-copy against the stock sequence.
func Ratios(rows []ExpRow) []string {
	keys, by := byConfig(rows)
	var out []string
	// The default (the read hand-over) and the page server's pre-copy, each against stock.
	for _, pc := range []struct{ c, label string }{{CasePrecopyRead, "pre-copy (default, read hand-over)"}, {CasePrecopy, "pre-copy (page server)"}} {
		for _, k := range keys {
			p, okp := by[k][pc.c]
			s, oks := by[k][CaseStock]
			if !okp || !oks || s.Gap == 0 || s.Bytes == 0 || s.Total == 0 {
				continue
			}
			out = append(out, fmt.Sprintf("%-16s %s / stock: downtime %.3f = 1/%.0f (%s vs %s)  bytes %.3f (%.1f vs %.1f MB)  total time %.2f (%s vs %s)",
				k.String(), pc.label, float64(p.Gap)/float64(s.Gap), float64(s.Gap)/float64(max(p.Gap, time.Millisecond)), p.Gap.Round(time.Millisecond), s.Gap.Round(time.Millisecond),
				float64(p.Bytes)/float64(s.Bytes), float64(p.Bytes)/1e6, float64(s.Bytes)/1e6,
				float64(p.Total)/float64(s.Total), p.Total.Round(100*time.Millisecond), s.Total.Round(100*time.Millisecond)))
		}
	}
	// Flat in memory: the default's downtime at the largest size against the smallest, per
	// dirty rate.
	flat := map[float64][]ExpRow{}
	for _, r := range rows {
		if r.Case == CasePrecopyRead && r.Workload == "" {
			flat[r.DirtyPct] = append(flat[r.DirtyPct], r)
		}
	}
	for _, pct := range slices.Sorted(maps.Keys(flat)) {
		bySize := func(a, b ExpRow) int { return cmp.Compare(a.SizeMiB, b.SizeMiB) }
		lo, hi := slices.MinFunc(flat[pct], bySize), slices.MaxFunc(flat[pct], bySize)
		if lo.SizeMiB == hi.SizeMiB || lo.Gap == 0 {
			continue
		}
		out = append(out, fmt.Sprintf("%g%%/s: default downtime %d MiB / %d MiB: %.2f (%s vs %s; held %s vs %s)", pct, hi.SizeMiB, lo.SizeMiB,
			float64(hi.Gap)/float64(lo.Gap), hi.Gap.Round(time.Millisecond), lo.Gap.Round(time.Millisecond), hi.Held.Round(time.Millisecond), lo.Held.Round(time.Millisecond)))
	}
	for _, k := range keys {
		p, okp := by[k][CasePostcopy]
		s, oks := by[k][CaseStock]
		if !okp || !oks || s.Gap == 0 || s.Bytes == 0 || s.Total == 0 {
			continue
		}
		out = append(out, fmt.Sprintf("%-16s post-copy / stock: downtime %.3f = 1/%.0f (%s vs %s)  bytes %.3f  total time %.2f; post-copy phase %s, client p99 %s in it (%s before the move)",
			k.String(), float64(p.Gap)/float64(s.Gap), float64(s.Gap)/float64(max(p.Gap, time.Millisecond)), p.Gap.Round(time.Millisecond), s.Gap.Round(time.Millisecond),
			float64(p.Bytes)/float64(s.Bytes), float64(p.Total)/float64(s.Total), p.Postcopy.Round(time.Millisecond),
			p.AfterP99.Round(100*time.Microsecond), p.BeforeP99.Round(100*time.Microsecond)))
	}
	return out
}

// WriteSVG draws two bar charts, downtime and bytes on the wire, one group of bars per
// configuration and one bar per case, on a log scale.
func WriteSVG(w io.Writer, rows []ExpRow) error {
	var cases []string // those the rows hold
	for _, c := range AllCases {
		if slices.ContainsFunc(rows, func(r ExpRow) bool { return r.Case == c }) {
			cases = append(cases, c)
		}
	}
	colors := map[string]string{CaseStock: "#888888", CaseStopCopy: "#e08030", CasePrecopyArchive: "#90b0e0", CasePrecopyRead: "#8060c0", CasePrecopy: "#2070c0", CasePostcopy: "#30a050"}
	keys, by := byConfig(rows)
	const bw, gap, left, panelH, top = 18, 24, 70, 220, 40
	groupW := len(cases)*bw + gap
	width := left + len(keys)*groupW + 160
	height := 2*(panelH+top+40) + 20
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	panel := func(y0 int, title, unit string, get func(ExpRow) float64) {
		max, min := 0.0, math.Inf(1)
		for _, rs := range by {
			for _, r := range rs {
				if v := get(r); v > 0 {
					max, min = math.Max(max, v), math.Min(min, v)
				}
			}
		}
		if max == 0 {
			return
		}
		lo := math.Floor(math.Log10(min))
		hi := math.Ceil(math.Log10(max))
		if hi == lo {
			hi++
		}
		yOf := func(v float64) float64 {
			return float64(y0+top+panelH) - (math.Log10(v)-lo)/(hi-lo)*panelH
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>`+"\n", left, y0+20, title)
		for e := lo; e <= hi; e++ {
			y := yOf(math.Pow(10, e))
			fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/><text x="%d" y="%.1f" text-anchor="end">%g %s</text>`+"\n",
				left, width-150, y, y, left-4, y+4, math.Pow(10, e), unit)
		}
		for i, k := range keys {
			x0 := left + i*groupW + gap/2
			for j, c := range cases {
				r, ok := by[k][c]
				if !ok || get(r) <= 0 {
					continue
				}
				y := yOf(get(r))
				fmt.Fprintf(&b, `<rect x="%d" y="%.1f" width="%d" height="%.1f" fill="%s"><title>%s %s: %.3g %s</title></rect>`+"\n",
					x0+j*bw, y, bw-2, float64(y0+top+panelH)-y, colors[c], k, c, get(r), unit)
			}
			// Two lines (size, dirty rate): one would overlap its neighbours.
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text><text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n",
				x0+len(cases)*bw/2, y0+top+panelH+14, k.size(), x0+len(cases)*bw/2, y0+top+panelH+27, k.rate())
		}
	}
	panel(0, "Downtime: largest gap seen by a sockperf client (100 Mbit/s, 10 ms RTT)", "s", func(r ExpRow) float64 { return r.Gap.Seconds() })
	panel(panelH+top+40, "Bytes on the wire", "MB", func(r ExpRow) float64 { return float64(r.Bytes) / 1e6 })
	for j, c := range cases {
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", width-140, top+j*18, colors[c], width-122, top+j*18+10, c)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}
