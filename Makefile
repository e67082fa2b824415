# tdxfuzz: the two entry points of README.md, and their parts.
# Every target installs what it needs (rustup components, cargo-fuzz) and says so.

CARGO ?= cargo
NIGHTLY ?= +nightly
SECONDS ?= 60
FUZZ_SECONDS ?= 20

.PHONY: fuzz test tools fuzz-tools check lint unit fuzz-smoke bench bench-engines clean

## The main job: build and run a campaign with a live status line; findings in artifacts/.
fuzz: tools
	$(CARGO) build --profile campaign
	./target/campaign/tdxfuzz fuzz --target stack --policy upstream --seconds $(SECONDS)

## The tests: formatting, lints, the test suite, and a short libFuzzer run of each target.
test: tools lint unit fuzz-smoke

tools:
	@rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || { echo "installing rustfmt"; rustup component add rustfmt; }
	@rustup component list --installed 2>/dev/null | grep -q '^clippy' || { echo "installing clippy"; rustup component add clippy; }

fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || { echo "error: the nightly toolchain is needed for cargo-fuzz (rustup toolchain install nightly)"; exit 1; }
	@command -v cargo-fuzz >/dev/null || { echo "installing cargo-fuzz"; $(CARGO) install cargo-fuzz --locked; }

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) build --release
	$(CARGO) test --workspace --release

fuzz-smoke: fuzz-tools
	@for t in $$(cargo $(NIGHTLY) fuzz list); do \
		echo "fuzzing $$t for $(FUZZ_SECONDS)s"; \
		mkdir -p fuzz/corpus/$$t corpus/$$t; \
		cargo $(NIGHTLY) fuzz run $$t fuzz/corpus/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 || exit 1; \
	done

bench:
	$(CARGO) build --profile campaign
	./target/campaign/tdxfuzz bench --scheduler --stack --sept

## The engine's throughput (one core, feedback on and off, the random loop, two jobs).
bench-engines:
	$(CARGO) build --profile campaign
	./target/campaign/tdxfuzz bench --engines

clean:
	$(CARGO) clean
	rm -rf fuzz/target artifacts
