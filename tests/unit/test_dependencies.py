"""What the services need at run time: grpcio-tools only generates the stubs (`make stubs`)."""

import subprocess
import sys

from genrpc.launch import ROOT

# Imports the services' entry points with grpc_tools made unimportable, as where it is not installed.
WITHOUT_GRPC_TOOLS = """
import sys

class NoGrpcTools:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc_tools" or name.startswith("grpc_tools."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoGrpcTools())
import gateway.__main__, model_svc.__main__, tokenizer_svc.__main__, genrpc.cli, genrpc.supervisor
print("imported")
"""


def test_the_services_run_without_the_stub_generator():
    done = subprocess.run([sys.executable, "-c", WITHOUT_GRPC_TOOLS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "imported", done.stderr[-2000:]


def test_the_blocker_is_real():
    # the same blocker makes the stub generator itself fail to import: the test above can fail
    code = WITHOUT_GRPC_TOOLS.replace("import gateway.__main__,", "import genrpc.stubs,")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "No module named 'grpc_tools'" in done.stderr
