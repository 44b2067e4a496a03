// Package overlaynet will keep a container's IP and MAC wherever it runs: an Open vSwitch
// bridge per host, VXLAN tunnels between hosts, OpenFlow rules re-pointed at a move.
package overlaynet
