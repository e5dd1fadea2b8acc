//! Fixtures shared by the fuzz targets: one member institution with an SM2 key.

#![allow(dead_code)]

use std::sync::OnceLock;

use yiqiao_registry::directory::Institution;
use yiqiao_sm::Sm2PrivateKey;

pub const RESIDENT_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";

/// The institution's SM2 key (fixed for the run).
pub fn key() -> &'static Sm2PrivateKey {
    static KEY: OnceLock<Sm2PrivateKey> = OnceLock::new();
    KEY.get_or_init(|| Sm2PrivateKey::generate().expect("SM2 key"))
}

/// Hospital fz-004 of the demo region, as the directory stores it.
pub fn institution() -> &'static Institution {
    static INST: OnceLock<Institution> = OnceLock::new();
    INST.get_or_init(|| {
        let pem = key().public_key().to_spki_pem().expect("SPKI PEM");
        serde_json::from_value(serde_json::json!({
            "id": "fz-004",
            "name": "福州市第4医院",
            "uscc": "12350100M00000004X",
            "region_code": "350100",
            "level": "3A",
            "kind": "hospital",
            "endpoint_url": null,
            "jwks": {"keys": []},
            "sm2_keys": [{"kid": "fz-004-sm2-1", "pem": pem}],
            "patient_id_system": "urn:oid:2.16.156.10011.1.99.350100.4",
            "allowed_scopes": ["system/Patient.cruds"],
            "require_sm_envelope": false,
            "status": "active",
            "version": 1,
            "created_at": "2026-01-01T00:00:00",
            "updated_at": "2026-01-01T00:00:00"
        }))
        .expect("institution fixture matches directory::Institution")
    })
}
