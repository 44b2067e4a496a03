package transfer

import (
	"fmt"
	"regexp"
)

// podman's rule for container names (libpod/define: NameRegex), anchored.
var containerName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)

// MaxHostName bounds host names: OVS names a host's tunnel ports after the peer
// ("vx-NAME"), and a Linux interface name holds 15 characters.
const MaxHostName = 12

var hostName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

// ValidContainerName checks a container name against podman's rules before it is used in
// a path, a journal or a command. It also bounds its length (podman allows 253).
func ValidContainerName(name string) error {
	if len(name) == 0 || len(name) > 253 || !containerName.MatchString(name) {
		return badRequest{fmt.Errorf("container name %q: want letters, digits, '_', '.' or '-', starting with a letter or digit (podman's rule)", name)}
	}
	return nil
}

// ValidHostName checks a host name: lower-case letters, digits and '-', at most
// MaxHostName characters (the overlay names interfaces after hosts).
func ValidHostName(name string) error {
	if len(name) == 0 || len(name) > MaxHostName || !hostName.MatchString(name) {
		return badRequest{fmt.Errorf("host name %q: want at most %d lower-case letters, digits or '-' (it names network interfaces)", name, MaxHostName)}
	}
	return nil
}
