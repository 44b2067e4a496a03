package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/migrate-project/migrate/checkpoint"
)

func TestParseVolume(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want checkpoint.Mount
		bad  bool
	}{
		{in: "data:/var/lib/redis", want: checkpoint.Mount{Type: "volume", Source: "data", Dest: "/var/lib/redis"}},
		{in: "pg-data:/var/lib/postgresql:ro", want: checkpoint.Mount{Type: "volume", Source: "pg-data", Dest: "/var/lib/postgresql", ReadOnly: true}},
		{in: "/srv/www:/usr/share/nginx/html:ro", want: checkpoint.Mount{Type: "bind", Source: "/srv/www", Dest: "/usr/share/nginx/html", ReadOnly: true}},
		{in: "data", bad: true},
		{in: "data:relative", bad: true},
		{in: "./here:/x", bad: true},
		{in: "-bad:/x", bad: true},
		{in: "data:/x:rx", bad: true},
		{in: "a:/b:ro:extra", bad: true},
	} {
		got, err := parseVolume(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("%q: accepted as %+v", tc.in, got)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
}

func TestParseBytes(t *testing.T) {
	for in, want := range map[string]int64{"512m": 512 << 20, "2g": 2 << 30, "64MiB": 64 << 20, "1048576": 1 << 20, "1.5g": 3 << 29} {
		if got, err := parseBytes(in); err != nil || got != want {
			t.Errorf("%q: %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "m", "-1g", "lots", "1e20g"} {
		if got, err := parseBytes(in); err == nil {
			t.Errorf("%q: accepted as %d", in, got)
		}
	}
}

func TestEnvFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "app.env")
	os.WriteFile(f, []byte("# a comment\nA=1\n\nB=two=2\nMIGRATE_TEST_FROM_ENV\n"), 0o644)
	t.Setenv("MIGRATE_TEST_FROM_ENV", "inherited")
	env, err := envList([]string{"A=override"}, f)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"A": "override", "B": "two=2", "MIGRATE_TEST_FROM_ENV": "inherited"}
	if !reflect.DeepEqual(env, want) {
		t.Errorf("got %v, want %v", env, want)
	}
	os.WriteFile(f, []byte("BAD KEY=1\n"), 0o644)
	if _, err := envList(nil, f); err == nil {
		t.Error("a key with a space was accepted")
	}
	if _, err := envList(nil, filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("a missing env file was accepted")
	}
}

func TestParseEntrypoint(t *testing.T) {
	if ep, err := parseEntrypoint(`["redis-server","--appendonly","yes"]`); err != nil || len(ep) != 3 {
		t.Errorf("JSON form: %v %v", ep, err)
	}
	if ep, err := parseEntrypoint("/bin/sh"); err != nil || !reflect.DeepEqual(ep, []string{"/bin/sh"}) {
		t.Errorf("plain form: %v %v", ep, err)
	}
	if _, err := parseEntrypoint(`["unterminated`); err == nil {
		t.Error("bad JSON accepted")
	}
}
