"""Helm through its Go SDK (the Python package helm-sdkpy; Python >= 3.12): what the chart tests
need, printed as JSON on stdout.

    helm_sdk.py lint CHART
    helm_sdk.py install KUBECONFIG NAMESPACE RELEASE CHART [VALUES_JSON]
    helm_sdk.py upgrade KUBECONFIG NAMESPACE RELEASE CHART [VALUES_JSON]
    helm_sdk.py manifest KUBECONFIG NAMESPACE RELEASE   (the rendered manifest, as `helm get manifest`)
    helm_sdk.py uninstall KUBECONFIG NAMESPACE RELEASE
"""

import asyncio
import json
import sys

import helm_sdkpy as helm


def config(kubeconfig, namespace):
    return helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)


async def main(argv):
    cmd = argv[0]
    if cmd == "lint":
        result = await helm.Lint(helm.Configuration()).run(argv[1])
    elif cmd in ("install", "upgrade"):
        kubeconfig, namespace, release, chart = argv[1:5]
        values = json.loads(argv[5]) if len(argv) > 5 else {}
        cfg = config(kubeconfig, namespace)
        # No kubelet in the test cluster: pods never become ready, so do not wait; validate
        # the rendered objects against the server's OpenAPI schema.
        if cmd == "install":
            result = await helm.Install(cfg).run(
                release, chart, values=values, wait=False, timeout=120,
                disable_openapi_validation=False,
            )
        else:
            result = await helm.Upgrade(cfg).run(
                release, chart, values=values, wait=False, timeout=120,
                disable_openapi_validation=False,
            )
    elif cmd == "manifest":
        kubeconfig, namespace, release = argv[1:4]
        result = await helm.Status(config(kubeconfig, namespace)).run(release)
    elif cmd == "uninstall":
        kubeconfig, namespace, release = argv[1:4]
        result = await helm.Uninstall(config(kubeconfig, namespace)).run(release, wait=False)
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(result, sys.stdout, default=str)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
