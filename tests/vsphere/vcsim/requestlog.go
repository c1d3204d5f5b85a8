package main

import (
	"encoding/json"
	"os"
	"sync"
	"time"

	"github.com/vmware/govmomi/simulator"
)

// requestLog (--request-log PATH) appends one JSON line per switch reconfiguration that changed
// something: when it happened, and the User-Agent the caller's session logged in with (vCenter
// keeps it as UserSession.userAgent; vtap puts its host name and process id there). Tests use it
// to tell which of several processes changed vCenter, and in which order.
var requestLog struct {
	sync.Mutex
	file *os.File
}

func openRequestLog(path string) error {
	file, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0600)
	requestLog.file = file
	return err
}

func logReconfigure(ctx *simulator.Context, method string, sessions []string) {
	if requestLog.file == nil {
		return
	}
	agent := ""
	if ctx.Session != nil {
		agent = ctx.Session.UserAgent
	}
	line, _ := json.Marshal(map[string]interface{}{
		"time": time.Now().UTC().Format(time.RFC3339Nano), "method": method, "userAgent": agent, "vspanSessions": sessions,
	})
	requestLog.Lock()
	defer requestLog.Unlock()
	requestLog.file.Write(append(line, '\n'))
}
