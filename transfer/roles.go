package transfer

import (
	"context"
	"crypto/x509"
	"fmt"
	"net/http"
	"strings"
)

// Role is what a certificate allows its holder to do. It is written in the certificate's
// subject (OrganizationalUnit "role:NAME") by `migrate certs issue --role`.
type Role string

const (
	// RoleHost is a host's agent: it moves containers to and from other hosts.
	RoleHost Role = "host"
	// RoleNode is an overlay-only node (a client with an address on the overlay): it
	// learns where endpoints run, nothing more.
	RoleNode Role = "node"
	// RoleOperator is a person or a cron job: run, push, status, plan.
	RoleOperator Role = "operator"
)

const roleOU = "role:"

// ParseRole checks a role's name.
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleHost, RoleNode, RoleOperator:
		return r, nil
	}
	return "", fmt.Errorf("role %q: want host, node or operator", s)
}

// RoleOf reads the role a certificate carries ("" when it carries none: such a
// certificate, from before roles, is refused everywhere).
func RoleOf(c *x509.Certificate) Role {
	for _, ou := range c.Subject.OrganizationalUnit {
		if r, ok := strings.CutPrefix(ou, roleOU); ok {
			if role, err := ParseRole(r); err == nil {
				return role
			}
		}
	}
	return ""
}

// caller is who sent a request: the verified client certificate's name and role.
type caller struct {
	Name string
	Role Role
}

type callerKey struct{}

func callerOf(ctx context.Context) caller {
	c, _ := ctx.Value(callerKey{}).(caller)
	return c
}

// errForbidden is the answer to a caller whose role may not use a path.
type errForbidden struct{ error }

// allow wraps a handler so that only callers with one of roles reach it. The caller's
// name and role travel in the request's context (callerOf).
func allow(h http.HandlerFunc, roles ...Role) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		c := caller{}
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			cert := r.TLS.PeerCertificates[0]
			c = caller{Name: cert.Subject.CommonName, Role: RoleOf(cert)}
		}
		for _, role := range roles {
			if c.Role == role && c.Role != "" {
				h(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, c)))
				return
			}
		}
		writeError(w, http.StatusForbidden, fmt.Errorf("%s %s: certificate %q with role %q may not do this (allowed: %v); issue one with `migrate certs issue --role`",
			r.Method, r.URL.Path, c.Name, c.Role, roles))
	}
}

// mustBe checks that the caller is the host a move names (agent-to-agent calls).
func mustBe(ctx context.Context, host, what string) error {
	c := callerOf(ctx)
	if c.Role != RoleHost || c.Name != host {
		return errForbidden{fmt.Errorf("%s: only host %s may do this, not %q (%s)", what, host, c.Name, c.Role)}
	}
	return nil
}
