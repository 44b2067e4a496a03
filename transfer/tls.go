package transfer

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Certificates live in a directory: ca.pem (the authority every agent trusts), and for
// each identity NAME.pem + NAME-key.pem. `migrate certs init` makes the authority (ca.pem
// and ca-key.pem, which stays with the operator), `migrate certs issue` the rest.

// InitCA creates a certificate authority in dir. It refuses to overwrite one.
func InitCA(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, "ca.pem")); err == nil {
		return fmt.Errorf("%s already holds a certificate authority", dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "migrate CA", Organization: []string{"migrate"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	return writePair(dir, "ca", der, key)
}

// IssueOptions are what a certificate says besides its name.
type IssueOptions struct {
	Role  Role     // required: what its holder may do
	Hosts []string // addresses and DNS names it is valid for (a host's agent)
	Force bool     // replace an existing certificate and key of that name
}

// Issue makes a certificate for name (a host, a node or an operator) signed by the
// authority in dir, valid as server and client, carrying o.Role. It refuses to replace an
// existing key unless o.Force.
func Issue(dir, name string, o IssueOptions) error {
	if _, err := ParseRole(string(o.Role)); err != nil {
		return err
	}
	if o.Role != RoleOperator {
		if err := ValidHostName(name); err != nil {
			return err
		}
	} else if name == "" || strings.ContainsAny(name, "/\\") || strings.HasPrefix(name, ".") || name == "ca" {
		return fmt.Errorf("operator name %q: want a plain name", name)
	}
	if _, err := os.Stat(filepath.Join(dir, name+"-key.pem")); err == nil && !o.Force {
		return fmt.Errorf("%s already holds a key for %q: pass --force to replace it (peers that trust the old one must be given the new one)", dir, name)
	}
	caCert, caKey, err := loadCA(dir)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"migrate"}, OrganizationalUnit: []string{roleOU + string(o.Role)}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(2, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{name},
	}
	for _, h := range o.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	return writePair(dir, name, der, key)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func writePair(dir, name string, der []byte, key *ecdsa.PrivateKey) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+"-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem"))
	if err != nil {
		return nil, nil, fmt.Errorf("certificate authority in %s: %w (create one with `migrate certs init`)", dir, err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("the CA key is not an ECDSA key")
	}
	return cert, key, nil
}

// TLSConfig returns the mutual-TLS 1.3 configuration of identity name in dir: it presents
// name's certificate and accepts only peers whose certificate the CA in dir signed.
func TLSConfig(dir, name string) (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("certificate of %q in %s: %w (issue one with `migrate certs issue --dir %s --role host|node|operator %s`)", name, dir, err, dir, name)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return nil, fmt.Errorf("certificate authority: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no certificate in %s", filepath.Join(dir, "ca.pem"))
	}
	rl := &revocationList{path: filepath.Join(dir, RevokedFile)}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		NextProtos:   []string{"http/1.1"},
		// Both sides refuse a peer whose certificate the authority revoked.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return nil
			}
			return rl.check(cs.PeerCertificates[0])
		},
	}, nil
}

// RevokedFile lists revoked certificates beside ca.pem: one serial number (hex) a line,
// then the name; `migrate certs revoke` appends to it. Copy it to every host's --certs
// directory with ca.pem; agents re-read it when it changes.
const RevokedFile = "revoked.txt"

// revocationList is RevokedFile, re-read when its modification time changes.
type revocationList struct {
	path string
	mu   sync.Mutex
	mod  time.Time
	size int64
	set  map[string]bool
}

func (rl *revocationList) check(c *x509.Certificate) error {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	st, err := os.Stat(rl.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		rl.set = nil
	case err != nil:
		return fmt.Errorf("revocation list: %w", err)
	case !st.ModTime().Equal(rl.mod) || st.Size() != rl.size:
		b, err := os.ReadFile(rl.path)
		if err != nil {
			return fmt.Errorf("revocation list: %w", err)
		}
		rl.set = map[string]bool{}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 0 && !strings.HasPrefix(f[0], "#") {
				rl.set[strings.ToLower(f[0])] = true
			}
		}
		rl.mod, rl.size = st.ModTime(), st.Size()
	}
	if rl.set[c.SerialNumber.Text(16)] {
		return fmt.Errorf("certificate %q (serial %s) is revoked", c.Subject.CommonName, c.SerialNumber.Text(16))
	}
	return nil
}

// Revoke adds the certificate of name in dir to dir's revocation list.
func Revoke(dir, name string) error {
	b, err := os.ReadFile(filepath.Join(dir, name+".pem"))
	if err != nil {
		return fmt.Errorf("certificate of %q: %w", name, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return fmt.Errorf("%s.pem holds no certificate", name)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, RevokedFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%s %s revoked %s\n", c.SerialNumber.Text(16), name, time.Now().UTC().Format(time.RFC3339))
	if err == nil {
		err = f.Sync()
	}
	return err
}
