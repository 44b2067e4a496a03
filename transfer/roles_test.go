package transfer

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migrate-project/migrate/pages"
)

// testPKI issues an authority and a certificate per role in a temporary directory.
func testPKI(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := InitCA(dir); err != nil {
		t.Fatal(err)
	}
	for name, role := range map[string]Role{"a": RoleHost, "b": RoleHost, "client": RoleNode, "operator": RoleOperator} {
		if err := Issue(dir, name, IssueOptions{Role: role, Hosts: []string{"127.0.0.1"}}); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// testAgent serves the agent's routes over mutual TLS on loopback, as host a, with only
// what a refusal needs (no podman, no overlay): a handler reached by mistake panics,
// which the server turns into a 500 (not the 403 the test wants).
func testAgent(t *testing.T, dir string) (*Agent, *httptest.Server) {
	t.Helper()
	return testAgentWith(t, dir, nil)
}

// testAgentWith is testAgent with connState watching the server's connections.
func testAgentWith(t *testing.T, dir string, connState func(net.Conn, http.ConnState)) (*Agent, *httptest.Server) {
	t.Helper()
	conf, err := TLSConfig(dir, "a")
	if err != nil {
		t.Fatal(err)
	}
	store, err := pages.OpenStore(t.TempDir(), 128<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	inv := &Inventory{Hosts: []HostEntry{{Name: "a", Agent: "127.0.0.1:1"}, {Name: "b", Agent: "127.0.0.1:2"}}}
	a := &Agent{cfg: AgentConfig{Name: "a", Inventory: inv, StateDir: t.TempDir()}, tls: conf, store: store,
		inflight: map[string]*inflightMove{}, sessions: map[string]*incoming{}, peers: map[string]*Peer{}}
	a.mv = &mover{self: "a", out: journal{filepath.Join(a.cfg.StateDir, "outgoing")}, in: journal{filepath.Join(a.cfg.StateDir, "incoming")}}
	srv := httptest.NewUnstartedServer(a.mux())
	srv.TLS = conf
	srv.Config.ConnState = connState
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return a, srv
}

func clientAs(t *testing.T, dir, identity string) *http.Client {
	t.Helper()
	conf, err := TLSConfig(dir, identity)
	if err != nil {
		t.Fatal(err)
	}
	conf.ServerName = "a"
	return &http.Client{Transport: &http.Transport{TLSClientConfig: conf}, Timeout: 10 * time.Second}
}

// Reproduction 2 of the issue: a node's certificate removed a running container through
// /v1/abort. Now every path refuses every role that does not need it, before acting.
func TestRolesRefuseWhatACertificateMayNotDo(t *testing.T) {
	dir := testPKI(t)
	_, srv := testAgent(t, dir)
	body := `{"container":"web","move":"x","source":"a"}`
	for _, tc := range []struct {
		who, method, path string
	}{
		{"client", "POST", PathAbort}, {"client", "POST", PathLocate}, {"client", "POST", PathPush},
		{"client", "POST", PathRun}, {"client", "POST", PathCommit}, {"client", "POST", PathPrepare},
		{"client", "POST", PathRestore}, {"client", "POST", PathPagesPut}, {"client", "GET", PathStatus},
		{"client", "GET", PathContainers}, {"client", "POST", PathOutcome}, {"client", "POST", PathImage},
		{"operator", "POST", PathAbort}, {"operator", "POST", PathCommit}, {"operator", "POST", PathPrepare},
		{"operator", "POST", PathRestore}, {"operator", "POST", PathLocate}, {"operator", "POST", PathPagesAnnounce},
		{"operator", "POST", PathOutcome}, {"operator", "POST", PathImage},
		{"b", "POST", PathPush}, {"b", "POST", PathRun}, {"b", "GET", PathStatus}, {"b", "POST", PathPushCancel},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, strings.NewReader(body))
		resp, err := clientAs(t, dir, tc.who).Do(req)
		if err != nil {
			t.Fatalf("%s %s as %s: %v", tc.method, tc.path, tc.who, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s %s as %s: %s, want 403", tc.method, tc.path, tc.who, resp.Status)
		}
	}
	// What each role needs is allowed.
	for _, tc := range []struct{ who, path string }{{"client", PathInfo}, {"client", PathLocations}, {"operator", PathInfo}, {"b", PathInfo}} {
		resp, err := clientAs(t, dir, tc.who).Get(srv.URL + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusForbidden {
			t.Errorf("GET %s as %s: forbidden", tc.path, tc.who)
		}
	}
}

// Agent-to-agent calls must come from the host the move names: b may not abort, commit or
// restore a move that a journal says comes from another host, nor prepare one "from a".
func TestAgentCallsMustComeFromTheMovesHost(t *testing.T) {
	dir := testPKI(t)
	a, srv := testAgent(t, dir)
	in := incomingMove{Prepare: PrepareRequest{Container: "web", Move: "m1", Source: "c"}, State: InPrepared}
	if err := a.mv.in.put("web", in); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, body string }{
		{PathAbort, `{"container":"web","move":"m1"}`},
		{PathCommit, `{"container":"web","move":"m1"}`},
		{PathRestore + "?container=web&move=m1", ``},
		{PathPrepare, `{"container":"web2","move":"m2","source":"a","endpoint":{"name":"web2","netns":"mig-web2"}}`},
	} {
		resp, err := clientAs(t, dir, "b").Post(srv.URL+tc.path, "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("POST %s as b: %s, want 403", tc.path, resp.Status)
		}
	}
	if got := a.mv.in.list(); len(got) != 1 {
		t.Fatalf("a refused call changed the journal: %v", got)
	}
}

// Names that could escape a path are refused before any use.
func TestNamesThatEscapePathsAreRefused(t *testing.T) {
	dir := testPKI(t)
	a, srv := testAgent(t, dir)
	for _, body := range []string{`{"container":"../../../etc/containers/policy","move":"m"}`, `{"container":"a/b","move":"m"}`} {
		for _, path := range []string{PathCommit, PathAbort, PathOutcome} {
			resp, err := clientAs(t, dir, "b").Post(srv.URL+path, "application/json", strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("POST %s %s: %s, want 400", path, body, resp.Status)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(a.cfg.StateDir, "..", "etc")); err == nil {
		t.Fatal("something was written outside the state directory")
	}
	for _, bad := range []string{"a-very-long-host", "A", "a_b", "", "-a"} {
		if ValidHostName(bad) == nil {
			t.Errorf("host name %q accepted", bad)
		}
	}
}

// A certificate from before roles (none in its subject) is refused everywhere; issuing
// over an existing key needs --force.
func TestCertificatesWithoutRoleAndOverwrites(t *testing.T) {
	dir := testPKI(t)
	_, srv := testAgent(t, dir)
	// As `certs issue` wrote them before roles: same authority, no role in the subject.
	caCert, caKey, err := loadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: serial(),
		Subject: pkix.Name{CommonName: "old", Organization: []string{"migrate"}}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := writePair(dir, "old", der, key); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{PathInfo, PathLocations, PathStatus} {
		resp, err := clientAs(t, dir, "old").Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("GET %s with a certificate without a role: %s, want 403", path, resp.Status)
		}
	}
	if err := Issue(dir, "a", IssueOptions{Role: RoleHost}); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("overwrote a key: %v", err)
	}
	if err := Issue(dir, "x", IssueOptions{}); err == nil {
		t.Fatal("issued a certificate without a role")
	}
	if err := Issue(dir, "a", IssueOptions{Role: RoleHost, Hosts: []string{"127.0.0.1"}, Force: true}); err != nil {
		t.Fatal(err)
	}
}

// One client per peer: 500 calls reuse a few connections, and leave the goroutines where
// they started.
func TestRepeatedCallsDoNotGrowConnectionsOrGoroutines(t *testing.T) {
	dir := testPKI(t)
	var conns atomic.Int64
	_, srv := testAgentWith(t, dir, func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	})
	// b's agent calling a: the same peer client each time, as the agent does.
	conf, _ := TLSConfig(dir, "b")
	b := &Agent{cfg: AgentConfig{Name: "b", Inventory: &Inventory{Hosts: []HostEntry{{Name: "a", Agent: srv.Listener.Addr().String()}}}}, tls: conf, peers: map[string]*Peer{}}
	call := func() {
		p, err := b.peer("a")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Info(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	call()
	runtime.GC()
	before := runtime.NumGoroutine()
	for i := 0; i < 500; i++ {
		call()
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := conns.Load(); n > 2 {
		t.Errorf("500 calls opened %d connections", n)
	}
	if after := runtime.NumGoroutine(); after > before+2 {
		t.Errorf("goroutines grew from %d to %d over 500 calls", before, after)
	}
	t.Logf("500 calls: %d connection(s), goroutines %d -> %d", conns.Load(), before, runtime.NumGoroutine())
}

// A handler's panic is a 500 and a log line, not a dead agent.
func TestPanicsInHandlersAreContained(t *testing.T) {
	rec := httptest.NewRecorder()
	recoverPanics(func(http.ResponseWriter, *http.Request) { panic("boom") })(rec, httptest.NewRequest("GET", "/", nil))
	if rec.Code != http.StatusInternalServerError || !bytes.Contains(rec.Body.Bytes(), []byte("internal error")) {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

// A revoked certificate is refused at the handshake, by an agent that has the new list.
func TestRevokedCertificateIsRefused(t *testing.T) {
	dir := testPKI(t)
	_, srv := testAgent(t, dir)
	if resp, err := clientAs(t, dir, "operator").Get(srv.URL + PathInfo); err != nil {
		t.Fatal(err)
	} else {
		resp.Body.Close()
	}
	if err := Revoke(dir, "operator"); err != nil {
		t.Fatal(err)
	}
	_, err := clientAs(t, dir, "operator").Get(srv.URL + PathInfo)
	if err == nil {
		t.Fatal("a revoked certificate was accepted")
	}
	if resp, err := clientAs(t, dir, "b").Get(srv.URL + PathInfo); err != nil {
		t.Fatalf("another certificate is refused too: %v", err)
	} else {
		resp.Body.Close()
	}
}

// A command about a container being moved is refused as busy (409, "busy"), saying from
// where to where since when, before anything is touched; the client sees IsBusy.
func TestRemoveOfAContainerBeingMovedIsBusy(t *testing.T) {
	dir := testPKI(t)
	a, srv := testAgent(t, dir)
	a.inflight["web"] = &inflightMove{to: "b", since: time.Now().Add(-3 * time.Second)}
	conf, err := TLSConfig(dir, "operator")
	if err != nil {
		t.Fatal(err)
	}
	p := NewPeer("a", strings.TrimPrefix(srv.URL, "https://"), conf)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = p.Remove(ctx, "web")
	var ae *AgentError
	if !errors.As(err, &ae) || ae.Code != http.StatusConflict || !IsBusy(err) || !strings.Contains(err.Error(), "web is being moved from a to b, since") {
		t.Fatalf("rm of a container being moved: %#v", err)
	}
	// Another container is not busy: the refusal is that a has no podman service here.
	if _, err = p.Remove(ctx, "db"); err == nil || IsBusy(err) {
		t.Fatalf("rm of a container not being moved: %v", err)
	}
}
