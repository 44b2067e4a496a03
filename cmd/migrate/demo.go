package main

import "github.com/urfave/cli/v2"

var demoCommand = &cli.Command{Name: "demo", Hidden: true}
