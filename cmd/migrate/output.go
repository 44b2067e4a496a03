package main

import (
	"encoding/json"

	"github.com/urfave/cli/v2"
)

// printJSON writes v as one JSON document on stdout.
func printJSON(c *cli.Context, v any) error {
	enc := json.NewEncoder(c.App.Writer)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printJSONLine writes v as one line of JSON (NDJSON streams).
func printJSONLine(c *cli.Context, v any) error {
	return json.NewEncoder(c.App.Writer).Encode(v)
}
