package main

import (
	"strings"

	"github.com/urfave/cli/v2"
)

// interspersed lists the commands whose flags may follow their arguments
// (`migrate push web --to b`); urfave/cli stops at the first argument otherwise. Commands
// whose trailing arguments are another program's command line (run, testbed exec) are
// not listed.
var interspersed = map[*cli.Command]bool{pushCommand: true, planCommand: true, autoCommand: true, layersCommand.Subcommands[0]: true,
	rmCommand: true, logsCommand: true, execCommand: true}

// reorderArgs moves the flags of an interspersed command before its arguments. It walks
// the command tree from the top (global flags here are bools or take '=' values), so a
// subcommand anywhere in the tree is found the same way.
func reorderArgs(cmds []*cli.Command, args []string) []string {
	for i := 1; i < len(args); i++ {
		a := args[i]
		if strings.HasPrefix(a, "-") {
			continue
		}
		cmd := findCommand(cmds, a)
		if cmd == nil {
			return args
		}
		if !interspersed[cmd] {
			cmds = cmd.Subcommands // a parent: its subcommand comes next
			continue
		}
		takesValue := map[string]bool{}
		for _, f := range cmd.Flags {
			_, isBool := f.(*cli.BoolFlag)
			for _, n := range f.Names() {
				takesValue[n] = !isBool
			}
		}
		var flags, pos []string
		rest := args[i+1:]
		for j := 0; j < len(rest); j++ {
			t := rest[j]
			if t == "--" {
				pos = append(pos, rest[j:]...)
				break
			}
			if strings.HasPrefix(t, "-") && len(t) > 1 {
				flags = append(flags, t)
				name := strings.TrimLeft(t, "-")
				if !strings.Contains(name, "=") && takesValue[name] && j+1 < len(rest) {
					flags = append(flags, rest[j+1])
					j++
				}
				continue
			}
			pos = append(pos, t)
		}
		return append(append(append([]string{}, args[:i+1]...), flags...), pos...)
	}
	return args
}

func findCommand(cmds []*cli.Command, name string) *cli.Command {
	for _, c := range cmds {
		if c.HasName(name) {
			return c
		}
	}
	return nil
}
