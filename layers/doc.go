// Package layers will compute which image layers a target host lacks and ship only those.
package layers
