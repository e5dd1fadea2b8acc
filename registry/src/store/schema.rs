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
    auth_events (id) {
        id -> Text,
        occurred_at -> Timestamp,
        client_id -> Nullable<Text>,
        outcome -> Text,
        oauth_error -> Nullable<Text>,
        reason -> Text,
        client_ip -> Nullable<Text>,
        jti -> Nullable<Text>,
        kid -> Nullable<Text>,
        alg -> Nullable<Text>,
        request_id -> Nullable<Text>,
    }
}

diesel::table! {
    gateway_keys (kid) {
        kid -> Text,
        generation -> BigInt,
        alg -> Text,
        private_pkcs8 -> Text,
        public_jwk -> Text,
        created_at -> Timestamp,
    }
}
