"""Writes the Kueue objects the offline cluster needs, derived from the Kueue module's own kustomize inputs
(config/components/crd and config/components/webhook under $(go env GOMODCACHE)/sigs.k8s.io/kueue@<version>),
rewritten for a manager that runs as a host process on 127.0.0.1 (scripts/cluster/kueue.sh):

- the CRDs, with the conversion-webhook patches that config/components/crd/kustomization.yaml enables;
- the mutating and validating webhook configurations, with the names config/default gives them (namePrefix).

The cluster has no kube-proxy, so the API server cannot reach a webhook behind a Service: every
`clientConfig.service` becomes `clientConfig.url: <url-base><path>` with the CA that signed the manager's
serving certificate as caBundle. Only the webhooks for Kueue's own API and for the enabled integrations are
kept: the others (pods, deployments, ray, kubeflow, ...) would otherwise intercept objects of frameworks this
manager does not serve (a pod webhook would sit in front of every pod the e2e creates).

    python kueue-manifests.py --module-dir DIR --url-base https://127.0.0.1:PORT --ca-file ca.crt \
        --integration batch/job > kueue.yaml
"""

from __future__ import annotations

import argparse
import base64
import copy
import sys
from pathlib import Path

import yaml

KUEUE_GROUP = "kueue.x-k8s.io"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def client_config(service: dict, url_base: str, ca_bundle: str) -> dict:
    path = service.get("path") or "/"
    return {"url": url_base.rstrip("/") + path, "caBundle": ca_bundle}


def crds(module: Path, url_base: str, ca_bundle: str) -> list[dict]:
    crd_dir = module / "config" / "components" / "crd"
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    by_name = {}
    for resource in kustomization["resources"]:
        for doc in load_all(crd_dir / resource):
            by_name[doc["metadata"]["name"]] = doc
    # Only the patches the kustomization enables (the commented-out ones are not in the parsed list).
    for patch in kustomization.get("patches") or []:
        doc = yaml.safe_load((crd_dir / patch["path"]).read_text())
        conversion = doc.get("spec", {}).get("conversion")
        if not conversion:
            continue
        name = doc["metadata"]["name"]
        if name not in by_name:
            sys.exit(f"kueue-manifests: {patch['path']} patches {name}, which is not among the CRDs in {crd_dir}")
        conversion = copy.deepcopy(conversion)
        webhook = conversion["webhook"]
        webhook["clientConfig"] = client_config(webhook["clientConfig"]["service"], url_base, ca_bundle)
        by_name[name]["spec"]["conversion"] = conversion
    return list(by_name.values())


def served_by(webhook: dict, integrations: list[tuple[str, str]]) -> bool:
    for rule in webhook.get("rules", []):
        for group in rule.get("apiGroups", []):
            if group == KUEUE_GROUP:
                return True
            if any(group == g and resource in rule.get("resources", []) for g, resource in integrations):
                return True
    return False


def webhooks(module: Path, url_base: str, ca_bundle: str, frameworks: list[str]) -> list[dict]:
    webhook_dir = module / "config" / "components" / "webhook"
    default = yaml.safe_load((module / "config" / "default" / "kustomization.yaml").read_text())
    prefix = default.get("namePrefix", "")
    # An integration is named <group>/<kind> ("batch/job"); core kinds have no group ("pod").
    integrations = []
    for framework in frameworks:
        group, _, kind = framework.rpartition("/")
        integrations.append((group, kind.lower() + "s"))
    out, matched = [], set()
    for doc in load_all(webhook_dir / "manifests.yaml"):
        if doc["kind"] not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"]["name"] = prefix + doc["metadata"]["name"]
        doc["metadata"].setdefault("labels", {})["app.kubernetes.io/name"] = "kueue"
        kept = []
        for hook in doc["webhooks"]:
            if not served_by(hook, integrations):
                continue
            hook["clientConfig"] = client_config(hook["clientConfig"]["service"], url_base, ca_bundle)
            for rule in hook.get("rules", []):
                matched.update((g, r) for g in rule.get("apiGroups", []) for r in rule.get("resources", []))
            kept.append(hook)
        doc["webhooks"] = kept
        out.append(doc)
    for framework, (group, resource) in zip(frameworks, integrations):
        if (group, resource) not in matched:
            sys.exit(f"kueue-manifests: no webhook in {webhook_dir}/manifests.yaml serves integration {framework!r} "
                     f"({group or 'core'}/{resource}); name it as in Kueue's integrations.frameworks, e.g. batch/job")
    if not any(doc["webhooks"] for doc in out):
        sys.exit(f"kueue-manifests: no webhook found in {webhook_dir}/manifests.yaml")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-dir", type=Path, required=True, help="sigs.k8s.io/kueue@<version> in GOMODCACHE")
    parser.add_argument("--url-base", required=True, help="https://127.0.0.1:<webhook port>")
    parser.add_argument("--ca-file", type=Path, required=True, help="the CA that signed the webhook's certificate")
    parser.add_argument("--integration", action="append", required=True,
                        help="an enabled integrations.frameworks entry (repeat), e.g. batch/job")
    args = parser.parse_args()
    if not (args.module_dir / "config" / "components").is_dir():
        sys.exit(f"kueue-manifests: {args.module_dir} has no config/components (not the Kueue module?)")
    ca_bundle = base64.b64encode(args.ca_file.read_bytes()).decode()
    docs = crds(args.module_dir, args.url_base, ca_bundle)
    docs += webhooks(args.module_dir, args.url_base, ca_bundle, args.integration)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
