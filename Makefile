# vmplug: the two set-up commands are `make demo` and `make test`; both install
# what they need (apt packages from bookworm-backports, the guest kernel,
# vhost-device-vsock, crates) and are re-runnable.

CARGO ?= cargo
GUEST_TARGET := x86_64-unknown-linux-gnu
STATIC := RUSTFLAGS="-C target-feature=+crt-static"
# At most two guests at once on these 2-core machines.
E2E_THREADS ?= 2

.PHONY: all setup build guest-agent lint unit e2e test demo bench package clean

all: build

setup:
	@scripts/setup-host.sh

# The static guest agent goes into guest images and the test initramfs.
guest-agent:
	$(STATIC) $(CARGO) build --release --locked -p vmplug-guest --target $(GUEST_TARGET)
	@ls -l target/$(GUEST_TARGET)/release/vmplug-guest | awk '{printf "vmplug-guest static binary: %.2f MiB\n", $$5/1048576}'

build: guest-agent
	$(CARGO) build --locked -p vmplug -p vmplug-e2e --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit:
	$(CARGO) test --locked --workspace --exclude vmplug-e2e

e2e: setup build
	$(CARGO) test --locked -p vmplug-e2e -- --test-threads=$(E2E_THREADS)

test: setup lint build unit e2e

demo: setup build
	$(CARGO) run --locked -q -p vmplug-e2e --bin vmplug-demo

clean:
	$(CARGO) clean
