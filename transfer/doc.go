// Package transfer will hold the agent protocol between `migrate serve` instances
// (mutually authenticated TLS 1.3, digest-checked streams, progress events).
package transfer
