//go:build wasip1

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"watchgate.dev/sdk"
)

type guard struct{}

func (guard) Handle(e watchgate.Event) error {
	suffix, ok := watchgate.Setting("suffix")
	if !ok {
		suffix = ".json"
	}
	if !strings.HasSuffix(e.Key, suffix) {
		return nil
	}
	invalid := map[string]string{}
	if raw, ok := watchgate.StateGet(stateKey); ok {
		if err := json.Unmarshal(raw, &invalid); err != nil {
			return fmt.Errorf("go-json-guard: state %q unreadable: %w", stateKey, err)
		}
	}
	changed, reason := apply(invalid, &e)
	if changed {
		raw, err := json.Marshal(invalid)
		if err != nil {
			return err
		}
		if err := watchgate.StateSet(stateKey, raw); err != nil {
			return fmt.Errorf("go-json-guard: saving state: %w", err)
		}
		if err := watchgate.FilesReplace(reportPath, report(invalid)); err != nil {
			return fmt.Errorf("go-json-guard: writing %s: %w", reportPath, err)
		}
	}
	if reason != "" {
		watchgate.Log(watchgate.Warn, fmt.Sprintf("%s:%s is not valid JSON: %s", e.Source, e.Key, reason))
		if v, _ := watchgate.Setting("reject"); v == "true" {
			return errors.New("invalid JSON in " + e.Key + ": " + reason)
		}
	}
	return nil
}

func init() { watchgate.Register(guard{}) }
