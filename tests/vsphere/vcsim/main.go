// Command vtap-vcsim is the govmomi vCenter simulator (Debian's golang-github-vmware-govmomi-dev)
// with this project's extensions where the stock simulator does not behave like vSphere:
// distributed port mirroring (switch.go, vspan.go), port keys on NICs and FetchDVPorts criteria
// (ports.go), NIC reconnects and VmMigratedEvent on relocation (vm.go).
//
// It listens on 127.0.0.1 only and prints VCSIM_URL=<url> as its first line, then runs until
// SIGTERM/SIGINT. Credentials come from VCSIM_USERNAME / VCSIM_PASSWORD (default user / pass),
// never from argv.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // the vAPI REST endpoints (tagging) under /rest
	"github.com/vmware/govmomi/vim25/mo"
)

func main() {
	hosts := flag.Int("hosts", 3, "ESXi hosts in the cluster")
	vms := flag.Int("vms", 4, "virtual machines in the cluster")
	datacenters := flag.Int("datacenters", 1, "datacenters, each with its cluster, VMs and distributed switch")
	useTLS := flag.Bool("tls", false, "serve https with a self-signed certificate")
	noErspan := flag.Bool("no-erspan", false, "report a switch without ERSPAN support (vspanCapability.erspanProtocolSupported=false)")
	denyVspan := flag.Bool("deny-vspan", false, "the user's role lacks the DVSwitch.Vspan privilege (vspan changes raise NoPermission)")
	noVapi := flag.Bool("no-vapi", false, "serve no vAPI REST endpoints (/rest: tagging), as an ESXi host or a vCenter without them")
	verbose := flag.Bool("verbose", false, "keep the simulator's request log")
	reconfigureLog := flag.String("request-log", "", "append each vspan reconfiguration (time, caller's User-Agent) to this file as a JSON line")
	flag.Parse()
	if *reconfigureLog != "" {
		if err := openRequestLog(*reconfigureLog); err != nil {
			fatal(err)
		}
	}
	if !*verbose {
		log.SetOutput(discard{})
	}

	model := simulator.VPX()
	model.Datacenter = *datacenters
	model.Host = 0 // every host is in the one cluster
	model.ClusterHost = *hosts
	model.Machine = *vms
	model.Portgroup = 2
	if err := model.Create(); err != nil {
		fatal(err)
	}
	extend(!*noErspan, *denyVspan)

	model.Service.Listen = &url.URL{Host: "127.0.0.1:0"}
	model.Service.Listen.User = url.UserPassword(envOr("VCSIM_USERNAME", "user"), envOr("VCSIM_PASSWORD", "pass"))
	// The stock vAPI simulator (Debian's govmomi): /rest/com/vmware/cis/session and
	// /rest/com/vmware/cis/tagging/{category,tag,tag-association}, as vCenter serves them.
	model.Service.RegisterEndpoints = !*noVapi
	if *useTLS {
		model.Service.TLS = new(tls.Config)
	}
	server := model.Service.NewServer()
	address := *server.URL
	address.User = nil
	fmt.Printf("VCSIM_URL=%s\n", address.String())
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	server.Close()
	model.Remove()
}

// extend replaces the stock switches and VMs in the registry with their extended versions.
func extend(erspan, denyVspan bool) {
	for _, obj := range byName(simulator.Map.All("DistributedVirtualSwitch")) {
		wrapSwitch(obj.(*simulator.DistributedVirtualSwitch), erspan, denyVspan)
	}
	// Debian's govmomi 0.24 ships a VmMigratedEvent message template that does not parse
	// ("{{.SourceHost.Name}," ...), which panics the first time the event is posted. The
	// message of vSphere's VmMigratedEvent, without the datastore parts this simulator lacks:
	events := simulator.Map.EventManager()
	for i := range events.Description.EventInfo {
		if events.Description.EventInfo[i].Key == "VmMigratedEvent" {
			events.Description.EventInfo[i].FullFormat = "Migration of virtual machine {{.Vm.Name}} from {{.SourceHost.Name}} to {{.Host.Name}} completed"
		}
	}
	// Sorted so that port keys come out the same on every run.
	for _, obj := range byName(simulator.Map.All("VirtualMachine")) {
		wrapVM(obj.(*simulator.VirtualMachine))
	}
	wrapVMFolders()
}

func byName(entities []mo.Entity) []mo.Entity {
	sort.Slice(entities, func(i, j int) bool {
		a, b := entities[i].Entity(), entities[j].Entity()
		return a.Name < b.Name || a.Name == b.Name && a.Self.Value < b.Self.Value
	})
	return entities
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "vtap-vcsim:", err)
	os.Exit(1)
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
