"""What a test does with vSphere tags: the vAPI REST tagging calls an administrator's tools make
(/rest/com/vmware/cis/tagging), straight to the simulator, never through vtap."""

import requests

REST = "/rest/com/vmware/cis"


class VapiTags:
    def __init__(self, sim):
        self.base = sim.url.rsplit("/sdk", 1)[0] + REST
        self.http = requests.Session()
        self.http.verify = False  # the simulator's self-signed certificate (tests only)
        answer = self.http.post(f"{self.base}/session", auth=(sim.user, sim.password))
        answer.raise_for_status()
        self.http.headers["vmware-api-session-id"] = answer.json()["value"]

    def _post(self, path, body, **params):
        answer = self.http.post(self.base + path, json=body, params=params)
        answer.raise_for_status()
        return answer.json().get("value") if answer.content.strip() else None

    def category(self, name):
        return self._post("/tagging/category", {"create_spec": {"name": name, "cardinality": "MULTIPLE", "associable_types": [], "description": ""}})

    def tag(self, category_id, name):
        return self._post("/tagging/tag", {"create_spec": {"name": name, "category_id": category_id, "description": ""}})

    def attach(self, tag_id, vm):
        self._post(f"/tagging/tag-association/id:{tag_id}", {"object_id": {"type": "VirtualMachine", "id": vm._moId}}, **{"~action": "attach"})

    def detach(self, tag_id, vm):
        self._post(f"/tagging/tag-association/id:{tag_id}", {"object_id": {"type": "VirtualMachine", "id": vm._moId}}, **{"~action": "detach"})
