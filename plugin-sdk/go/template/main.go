//go:build wasip1

// Command {{name}} is a watchgate plugin in Go.
//
// Build: ./build.sh (writes {{name}}.wasm). Try it on recorded events:
// watchgate plugin test {{name}}.wasm --events events.jsonl
// Deploy: copy {{name}}.wasm into the gateway's plugin directory, with
// {{name}}.toml beside it (see sidecar.example.toml) for grants and settings.
// manifest.toml is the plugin's manifest.
package main

import (
	"fmt"
	"unicode/utf8"

	"watchgate.dev/sdk"
)

type handler struct{}

func (handler) Handle(e watchgate.Event) error {
	value := "<deleted or binary>"
	if e.HasValue && utf8.Valid(e.Value) {
		value = string(e.Value)
	}
	watchgate.Log(watchgate.Info, fmt.Sprintf("%s %s %s = %s", e.Kind, e.Source, e.Key, value))
	return nil
}

// The plugin is a reactor: init runs when it is loaded, main never does.
func init() { watchgate.Register(handler{}) }

func main() {}
