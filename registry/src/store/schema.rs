//! Portable diesel schema: only column types that SQLite and PostgreSQL share.
//! Keep in step with `migrations/{sqlite,postgres}` (a test compares both trees).

diesel::table! {
    institutions (id) {
        id -> Text,
        name -> Text,
        uscc -> Text,
        region_code -> Text,
        level -> Text,
        kind -> Text,
        endpoint_url -> Nullable<Text>,
        jwks -> Text,
        sm2_keys -> Text,
        patient_id_system -> Text,
        allowed_scopes -> Text,
        require_sm_envelope -> Bool,
        status -> Text,
        version -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    audit_events (seq) {
        seq -> BigInt,
        event_id -> Text,
        recorded_at -> Timestamp,
        type_code -> Text,
        subtype_code -> Text,
        outcome -> Text,
        agent_institution -> Nullable<Text>,
        agent_user -> Nullable<Text>,
        purpose_of_use -> Nullable<Text>,
        patient_id -> Nullable<Text>,
        consent_decision -> Nullable<Text>,
        request_id -> Nullable<Text>,
        source_replica -> Text,
        resource -> Text,
        prev_hash -> Text,
        hash -> Text,
    }
}

diesel::table! {
    audit_checkpoints (seq) {
        seq -> BigInt,
        head_hash -> Text,
        signed_at -> Timestamp,
        key_id -> Text,
        signature -> Text,
    }
}

diesel::table! {
    audit_chain_head (id) {
        id -> Integer,
        head_seq -> BigInt,
        head_hash -> Text,
        checkpoint_seq -> BigInt,
        updated_at -> Timestamp,
    }
}
