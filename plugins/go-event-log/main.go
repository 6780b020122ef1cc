//go:build wasip1

package main

import (
	"fmt"

	"watchgate.dev/sdk"
)

const logPath = "events.jsonl"

type eventLog struct{}

func (eventLog) Handle(e watchgate.Event) error {
	if err := watchgate.FilesAppend(logPath, jsonLine(&e)); err != nil {
		return fmt.Errorf("go-event-log: append to %s failed: %w", logPath, err)
	}
	return nil
}

func init() { watchgate.Register(eventLog{}) }
