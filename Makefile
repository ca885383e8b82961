# vmplug: the two set-up commands are `make demo` and `make test`; both install
# what they need (apt packages from bookworm-backports, the guest kernel,
# vhost-device-vsock, crates) and are re-runnable. `make demo` sets up and builds
# only what its x86 guest uses (setup-demo, guest-agent-x86); `make test` and
# `make bench` set up everything (setup: the aarch64 and trixie kernels too).

CARGO ?= cargo
GUEST_TARGET := x86_64-unknown-linux-gnu
# The aarch64 agent (the guide's platform): static musl, linked by rust-lld
# (.cargo/config.toml); `make setup` adds the Rust target.
GUEST_TARGET_ARM := aarch64-unknown-linux-musl
STATIC := RUSTFLAGS="-C target-feature=+crt-static"
# At most two guests at once on these 2-core machines.
E2E_THREADS ?= 2

PKG_DIR := target/packages
# Where cargo puts what it builds (CARGO_TARGET_DIR moves it).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
TOOLS := $(or $(VMPLUG_CACHE),/var/tmp/vmplug-cache)/bin
# The man pages' date: the last commit's (reproducible), else now.
SOURCE_DATE := $(or $(SOURCE_DATE_EPOCH),$(shell git log -1 --format=%ct 2>/dev/null),$(shell date +%s))

.PHONY: all setup setup-demo build guest-agent guest-agent-x86 lint unit e2e test demo demo-bins bench bench-fleet fuzz package package-test clean

all: build

setup:
	@scripts/setup-host.sh

setup-demo:
	@scripts/setup-host.sh demo

# The static guest agent goes into guest images and the test initramfs; the
# demo's guest needs only the x86 one.
guest-agent-x86:
	$(STATIC) $(CARGO) build --release --locked -p vmplug-guest --target $(GUEST_TARGET)
	@ls -l $(TARGET_DIR)/$(GUEST_TARGET)/release/vmplug-guest | awk '{printf "vmplug-guest static binary ($(GUEST_TARGET)): %.2f MiB\n", $$5/1048576}'

guest-agent:
	@rustup target list --installed | grep -qx $(GUEST_TARGET_ARM) || rustup target add $(GUEST_TARGET_ARM)
	$(STATIC) $(CARGO) build --release --locked -p vmplug-guest --target $(GUEST_TARGET) --target $(GUEST_TARGET_ARM)
	@for t in $(GUEST_TARGET) $(GUEST_TARGET_ARM); do \
	  ls -l $(TARGET_DIR)/$$t/release/vmplug-guest | awk -v t=$$t '{printf "vmplug-guest static binary (%s): %.2f MiB\n", t, $$5/1048576}'; done

build: guest-agent
	$(CARGO) build --locked -p vmplug -p vmplug-e2e --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	# The fuzz targets are their own workspace; keep them compiling on stable.
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	$(CARGO) clippy --locked --manifest-path fuzz/Cargo.toml -- -D warnings

unit:
	$(CARGO) test --locked --workspace --exclude vmplug-e2e

# --no-fail-fast: one failing file does not hide how the others fare.
e2e: setup build
	$(CARGO) test --locked --no-fail-fast -p vmplug-e2e -- --test-threads=$(E2E_THREADS)

# Guest .deb/.rpm (static agent, unit, config, rules, man pages) and host
# .deb/.rpm; each with the licences and notices of every crate it links,
# written from Cargo.lock by cargo-about (offline: what cargo fetched). cargo-about
# reads every platform's dependencies, so the fetch covers them all: a build
# fetches only this host's (anstyle-wincon is Windows-only).
package: setup guest-agent
	$(CARGO) build --release --locked -p vmplug
	rm -rf target/assets && SOURCE_DATE_EPOCH=$(SOURCE_DATE) $(TARGET_DIR)/release/vmplug-assets target/assets
	cp guest-agent/man/vmplug-guest.8 guest-agent/man/guest.toml.5 target/assets/man/
	gzip -9n target/assets/man/*
	mkdir -p target/assets/notices
	$(CARGO) fetch --locked
	$(TOOLS)/cargo-about generate --frozen -c about.toml -m host-agent/Cargo.toml -o target/assets/notices/vmplug about.hbs
	$(TOOLS)/cargo-about generate --frozen -c about.toml -m guest-agent/Cargo.toml -o target/assets/notices/vmplug-guest about.hbs
	rm -rf $(PKG_DIR) && mkdir -p $(PKG_DIR)
	$(TOOLS)/cargo-deb -p vmplug-guest --no-build --target $(GUEST_TARGET) -o $(PKG_DIR)/
	$(TOOLS)/cargo-deb -p vmplug-guest --no-build --target $(GUEST_TARGET_ARM) -o $(PKG_DIR)/
	$(TOOLS)/cargo-deb -p vmplug --no-build -o $(PKG_DIR)/
	$(TOOLS)/cargo-generate-rpm -p guest-agent --target $(GUEST_TARGET) -o $(PKG_DIR)/
	$(TOOLS)/cargo-generate-rpm -p guest-agent --target $(GUEST_TARGET_ARM) -o $(PKG_DIR)/
	$(TOOLS)/cargo-generate-rpm -p host-agent -o $(PKG_DIR)/
	@ls -l $(PKG_DIR)

package-test: package
	scripts/check-packages.sh $(PKG_DIR)

test: setup lint build unit package-test e2e

# The demo boots one x86 guest: it sets up and builds that guest's kernel,
# the x86 agent, vmplug and itself, nothing else (its guest talks over
# virtio-serial, so no vsock backend is built). After the apt packages (vmplug
# links libvirt), the kernel download and the two builds run side by side: each
# build ends in a long step on one core (linking) and these machines have two.
# Their lines interleave (cargo's progress bars, which would overwrite one
# another, are off).
demo:
	@scripts/setup-host.sh demo-packages
	@CARGO_TERM_PROGRESS_WHEN=never $(MAKE) --no-print-directory -j3 setup-demo guest-agent-x86 demo-bins
	$(CARGO) run --locked -q -p vmplug-e2e --bin vmplug-demo

demo-bins:
	$(CARGO) build --locked -p vmplug --bin vmplug -p vmplug-e2e --bin vmplug-demo

clean:
	$(CARGO) clean

# Hot-plug latency of vmplug vs the guide's methods, and the agent's footprint.
bench: setup build
	$(CARGO) build --profile bench-run --locked -p vmplug -p vmplug-e2e --bins
	VMPLUG_BIN=$(TARGET_DIR)/bench-run/vmplug $(TARGET_DIR)/bench-run/vmplug-bench

# Autoscale at fleet scale: 100 to 10,000 domains over 1 and 10 private
# libvirtd daemons (libvirt's test driver behind their RPC sockets), simulated
# agents on the real protocol, the real `vmplug autoscale` on its 5 s beat.
# Boots no guest (no guest lock), but loads both cores for about 10 minutes;
# not part of `make test`. Needs libvirt-daemon-system (`make setup`).
bench-fleet:
	$(CARGO) build --release --locked -p vmplug -p vmplug-e2e --bin vmplug --bin vmplug-bench-fleet
	VMPLUG_BIN=$(TARGET_DIR)/release/vmplug $(TARGET_DIR)/release/vmplug-bench-fleet

# A bounded coverage-guided fuzz campaign (cargo-fuzz); FUZZ_SECONDS per target.
fuzz:
	scripts/fuzz.sh
