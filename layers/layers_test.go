package layers

import (
	"archive/tar"
	"bytes"
	"io"
	"strings"
	"testing"
)

const (
	d1 = "1111111111111111111111111111111111111111111111111111111111111111"
	d2 = "2222222222222222222222222222222222222222222222222222222222222222"
)

func archive(t *testing.T) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	add := func(name string, data string) {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o444, Size: int64(len(data)), Typeflag: tar.TypeReg})
		io.WriteString(tw, data)
	}
	add(d1+".tar", strings.Repeat("a", 5000))
	add(d2+".tar", strings.Repeat("b", 7000))
	tw.WriteHeader(&tar.Header{Name: "x/layer.tar", Linkname: "../" + d1 + ".tar", Typeflag: tar.TypeSymlink})
	add("manifest.json", `[{"Layers":["`+d1+`.tar","`+d2+`.tar"]}]`)
	tw.Close()
	return b.Bytes()
}

func TestFilterKeepsOnlyMissingLayers(t *testing.T) {
	var out bytes.Buffer
	st, err := Filter(bytes.NewReader(archive(t)), &out, map[string]bool{"sha256:" + d1: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.LayersSkipped != 1 || st.LayersSent != 1 || st.BytesSkipped != 5000 {
		t.Fatalf("stats %+v", st)
	}
	tr := tar.NewReader(&out)
	sizes := map[string]int64{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		n, _ := io.Copy(io.Discard, tr)
		sizes[h.Name] = n
	}
	if s, ok := sizes[d1+".tar"]; !ok || s != 0 {
		t.Errorf("held layer must stay as an empty placeholder, got %v %v", s, ok)
	}
	if sizes[d2+".tar"] != 7000 || sizes["manifest.json"] == 0 {
		t.Errorf("missing layer or metadata lost: %v", sizes)
	}
	if _, ok := sizes["x/layer.tar"]; !ok {
		t.Error("symlinks must pass")
	}
	if out.Len() > 7000+6*1024 {
		t.Errorf("filtered archive of %d bytes for 7000 bytes of missing layer", out.Len())
	}
}

func TestPlanAndCost(t *testing.T) {
	ls := []Layer{{DiffID: "sha256:a", Size: 10}, {DiffID: "sha256:b", Size: 20}, {DiffID: "sha256:c", Size: 40}}
	p := NewPlan("img", "id", "t", ls, map[string]bool{"sha256:a": true, "sha256:b": true}, false)
	if p.MissingBytes != 40 || p.MissingLayers != 1 || p.TotalBytes != 70 {
		t.Fatalf("plan %+v", p)
	}
	if q := NewPlan("img", "id", "t", ls, nil, true); q.MissingBytes != 0 {
		t.Fatalf("a target with the image needs nothing: %+v", q)
	}
	c := Cost(ls, map[string]map[string]bool{"x": {"sha256:a": true}, "y": {}, "z": {"sha256:a": true, "sha256:b": true, "sha256:c": true}})
	if c["x"] != 60 || c["y"] != 70 || c["z"] != 0 {
		t.Fatalf("cost %v", c)
	}
}

func TestFilterRejectsGarbage(t *testing.T) {
	if _, err := Filter(strings.NewReader(strings.Repeat("x", 2000)), io.Discard, nil); err == nil {
		t.Error("a stream that is not a tar must fail")
	}
}
