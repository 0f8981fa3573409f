# zblock: the two commands a new user needs are `make demo` and `make test`.
# Both install what is missing first: Debian packages through apt-get (only those dpkg -s
# reports missing) and Python packages into .venv.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
# fuse3 and libfuse2 side by side (never the `fuse` package: it conflicts with fuse3);
# gcc and liblzo2-dev because python-lzo builds from source, gcc, liblz4-dev and libssl-dev for
# zblock's own extensions (zblock/_lz4pages.c, zblock/_sealpages.c, zblock/fuse/_devread.c);
# redis-server and redis-tools for the far tier's test clusters;
# the rest are the real clients tests drive.
DEB_PKGS := fuse3 libfuse2 gcc liblzo2-dev liblz4-dev libssl-dev fio e2fsprogs util-linux redis-server redis-tools
DEB_BENCH_PKGS := nbdkit libnbd-bin

.PHONY: all deps sysdeps venv test test-fast demo bench install uninstall clean

all: test

sysdeps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml setup.py zblock/_lz4pages.c zblock/_sealpages.c zblock/_gil.h \
		zblock/fuse/_devread.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

venv: sysdeps $(VENV)/.installed

deps: venv

# The second run: the engine, the model tests, the native front end's protocol and one real mount
# without the optional C extensions (python-lz4 and zblock.scan serve lz4; every FUSE worker
# reads the device, none spins), as a machine without gcc or liblz4-dev runs them.
NO_EXTENSION_TESTS := tests/test_store.py tests/test_acomp.py tests/test_accel.py \
	tests/test_staging.py tests/test_compressors.py tests/test_encrypt.py \
	tests/test_fuse_native.py tests/test_handoff.py tests/test_mount.py::test_dd_write_then_cmp

# The third run: the tests with real mounts once more on the mfusepy front end (libfuse 3); the
# first run mounts with the native one (tests/test_mount.py and tests/test_fuse_uring.py name
# their front ends themselves).
test: deps
	$(PY) -m pytest -q tests --ignore=tests/perf
	ZBLOCK_NO_EXTENSION=1 $(PY) -m pytest -q -k 'not c_scan and not lz4pages and not c_and_python' \
	  $(NO_EXTENSION_TESTS)
	ZBLOCK_TEST_FUSE=fuse3 $(PY) -m pytest -q -m mount tests --ignore=tests/perf \
	  --ignore=tests/test_mount.py --ignore=tests/test_fuse_uring.py

test-fast: deps
	$(PY) -m pytest -q tests -m 'not mount and not slow'

# matplotlib (the `bench` extra) for `zblock bench --plot`: README's commands work after make demo
$(VENV)/.bench: $(VENV)/.installed
	$(PIP) install -q -e '.[test,bench]'
	touch $@

demo: deps $(VENV)/.bench
	$(PY) -m zblock.demo

bench: deps
	@missing=""; for p in $(DEB_BENCH_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(PIP) install -q -e '.[test,bench]'
	$(PY) -m pytest -q -s tests/perf -p no:cacheprovider

# the mount(8)/umount(8) helpers for `mount -t fuse.zblock` and fstab, and the systemd units
install: deps
	sh mount/install.sh install

uninstall:
	sh mount/install.sh uninstall

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache zblock/*.so
