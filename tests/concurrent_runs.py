"""Run several command-line cases at once: each one pays the seconds of importing torch,
so the suite starts them together and then collects them."""
import subprocess


def collect(procs: dict, timeout: float) -> dict:
    """name -> (exit code, stdout, stderr) of the started `procs`; kills any left running."""
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results
