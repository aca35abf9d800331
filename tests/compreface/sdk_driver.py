"""Runs inside .venv-compreface (compreface-sdk==0.6.0, urllib3<2), never imported by pytest:
drives a live advplugin with the official CompreFace Python SDK and prints what it answered
as JSON. `python sdk_driver.py PHASE CONFIG.json`; PHASE is `enroll` (add examples, list,
recognize every probe, verify by image id, detection, verification service), `manage`
(subjects add/rename/list/delete, delete by image id, by subject, many, refused plugin) or
`recognize` (probes and verify-by-image-id pairs against a migrated gallery).

Calls the SDK does not offer in 0.6.0 (add by base64, delete many) go through `requests`,
as a CompreFace user would send them.
"""

from __future__ import annotations

import base64
import json
import sys

import requests
from compreface import CompreFace


def main() -> None:
    phase, cfg = sys.argv[1], json.load(open(sys.argv[2]))
    cf = CompreFace("http://127.0.0.1", str(cfg["port"]))
    recognition = cf.init_face_recognition(cfg["api_key"])
    faces = recognition.get_face_collection()
    subjects = recognition.get_subjects()
    base = f"http://127.0.0.1:{cfg['port']}/api/v1/recognition"
    headers = {"x-api-key": cfg["api_key"]}
    out: dict = {}
    if phase == "enroll":
        added = []
        for i, (name, path) in enumerate(cfg["gallery"]):
            if i % 2:  # the SDK sends bytes as a multipart file named image.jpg
                added.append(faces.add(image_path=open(path, "rb").read(), subject=name))
            else:
                added.append(faces.add(image_path=path, subject=name))
        name, path = cfg["gallery"][0]
        b64 = base64.b64encode(open(path, "rb").read()).decode()
        r = requests.post(f"{base}/faces", params={"subject": name}, json={"file": b64}, headers=headers)
        out["add_base64"] = {"status": r.status_code, "body": r.json()}
        out["added"] = added
        out["list"] = faces.list()
        out["recognize"] = [recognition.recognize(image_path=p, options={"prediction_count": 2, "limit": 1})
                            for p in cfg["probes"]]
        same = cfg["verify"]
        out["verify_same"] = faces.verify(image_path=same["probe"], image_id=added[same["gallery_index"]]["image_id"])
        out["verify_other"] = faces.verify(image_path=same["probe"], image_id=added[same["other_index"]]["image_id"])
        out["detect"] = cf.init_face_detection(cfg["api_key"]).detect(image_path=same["probe"])
        verification = cf.init_face_verification(cfg["api_key"])
        out["verification_same"] = verification.verify(
            source_image_path=same["probe"], target_image_path=cfg["gallery"][same["gallery_index"]][1])
        out["verification_other"] = verification.verify(
            source_image_path=same["probe"], target_image_path=cfg["gallery"][same["other_index"]][1])
        out["status_option"] = recognition.recognize(image_path=same["probe"], options={"status": "true"})
    elif phase == "manage":
        m = cfg["manage"]
        out["subjects_before"] = subjects.list()
        out["subject_add"] = subjects.add(m["new_subject"])
        out["subject_add_again"] = subjects.add(m["existing"])
        out["rename"] = subjects.update(m["existing"], m["renamed"])
        out["recognize_renamed"] = recognition.recognize(image_path=m["probe_of_existing"])
        out["subjects_after_rename"] = subjects.list()
        out["delete_by_id"] = faces.delete(m["delete_image_id"])
        out["delete_by_id_again"] = faces.delete(m["delete_image_id"])
        r = requests.post(f"{base}/faces/delete", json=m["delete_many"], headers=headers)
        out["delete_many"] = {"status": r.status_code, "body": r.json()}
        out["delete_all_of_subject"] = faces.delete_all(m["delete_examples_of"])
        out["list_after_deletes"] = faces.list()
        out["subject_delete"] = subjects.delete(m["delete_subject"])
        out["subject_delete_missing"] = subjects.delete(m["delete_subject"])
        out["calculator"] = recognition.recognize(image_path=m["probe_of_existing"],
                                                  options={"face_plugins": "calculator"})
        out["download"] = requests.get(f"{base}/faces/{m['delete_many'][0]}/img", headers=headers).json()
        out["wrong_key"] = CompreFace("http://127.0.0.1", str(cfg["port"])).init_face_recognition(
            "not-a-key").recognize(image_path=m["probe_of_existing"])
        out["subjects_delete_all"] = subjects.delete_all()
        out["subjects_final"] = subjects.list()
        out["list_final"] = faces.list()
    elif phase == "recognize":  # a migrated gallery, spoken to with the CompreFace API key
        out["recognize"] = [recognition.recognize(image_path=p, options={"limit": 1}) for p in cfg["probes"]]
        out["verify"] = [faces.verify(image_path=p, image_id=i) for p, i in cfg["verify_pairs"]]
        out["list"] = faces.list()
    else:
        raise SystemExit(f"unknown phase {phase}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
