"""The server's logging: what the user must not miss reaches the system log."""

import os
import socket
import subprocess
import sys

import pytest

import mountutil


@pytest.mark.skipif(os.path.exists("/dev/log"), reason="a syslog daemon owns /dev/log here")
@pytest.mark.timeout(60)
def test_warnings_go_to_syslog_with_the_pid():
    """setup_logging() with a syslog socket: warnings and worse reach it as zblock[PID], with
    their priority (user.warning 12, user.crit 10); info does not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    try:
        sock.settimeout(10)
        code = ("import logging, os\nfrom zblock import daemon\ndaemon.setup_logging()\n"
                "log = logging.getLogger('zblock.test')\nlog.info('not this')\n"
                "log.warning('page 5 lost')\nlog.critical('bad')\nprint(os.getpid())\n")
        res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                             timeout=30, env=mountutil.env(), cwd="/")
        assert res.returncode == 0, res.stderr
        pid = res.stdout.strip()
        got = [sock.recv(4096).decode() for _ in range(2)]
    finally:
        sock.close()
        os.unlink("/dev/log")
    assert got[0].startswith("<12>") and got[0].endswith(f"zblock[{pid}]: page 5 lost"), got
    assert got[1].startswith("<10>") and got[1].endswith(f"zblock[{pid}]: bad"), got
