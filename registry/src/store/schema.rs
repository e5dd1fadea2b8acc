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

diesel::table! {
    empi_persons (id) {
        id -> Text,
        status -> Text,
        merged_into -> Nullable<Text>,
        version -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    empi_source_records (id) {
        id -> Text,
        institution_id -> Text,
        id_system -> Text,
        id_value -> Text,
        name_search -> Text,
        family -> Text,
        given -> Text,
        sex -> Nullable<Text>,
        birth_date -> Nullable<Text>,
        resident_id -> Nullable<Text>,
        phone -> Nullable<Text>,
        record_json -> Text,
        resource -> Text,
        version -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    empi_links (record_id) {
        record_id -> Text,
        person_id -> Text,
        score -> Nullable<Double>,
        explanation -> Nullable<Text>,
        decided_by -> Text,
        actor -> Text,
        decided_at -> Timestamp,
    }
}

diesel::table! {
    empi_blocking_keys (record_id, key) {
        record_id -> Text,
        key -> Text,
    }
}

diesel::table! {
    empi_review_items (id) {
        id -> Text,
        record_a -> Text,
        record_b -> Text,
        score -> Double,
        explanation -> Text,
        status -> Text,
        resolver -> Nullable<Text>,
        note -> Nullable<Text>,
        created_at -> Timestamp,
        resolved_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    empi_parameters (version) {
        version -> BigInt,
        model -> Text,
        source -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    empi_quality_issues (record_id, issue) {
        record_id -> Text,
        issue -> Text,
    }
}

diesel::table! {
    empi_events (id) {
        id -> Text,
        kind -> Text,
        person_id -> Nullable<Text>,
        other_person_id -> Nullable<Text>,
        record_id -> Nullable<Text>,
        actor -> Text,
        detail -> Text,
        created_at -> Timestamp,
        notified_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    empi_write_lock (id) {
        id -> Integer,
        counter -> BigInt,
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

diesel::table! {
    oidc_logins (state_hash) {
        state_hash -> Text,
        nonce -> Text,
        pkce_verifier -> Text,
        return_to -> Text,
        created_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    staff_sessions (id_hash) {
        id_hash -> Text,
        kind -> Text,
        parent_hash -> Nullable<Text>,
        subject -> Text,
        name -> Nullable<Text>,
        roles -> Text,
        created_at -> Timestamp,
        expires_at -> Timestamp,
    }
}

diesel::table! {
    institution_client_certs (institution_id) {
        institution_id -> Text,
        sha256 -> Text,
        bound_at -> Timestamp,
    }
}

diesel::table! {
    consents (id) {
        id -> Text,
        version -> BigInt,
        patient_id -> Text,
        status -> Text,
        provision -> Text,
        period_start -> Nullable<Timestamp>,
        period_end -> Nullable<Timestamp>,
        recorded_by -> Text,
        resource -> Text,
        change_seq -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    consent_history (id, version) {
        id -> Text,
        version -> BigInt,
        status -> Text,
        resource -> Text,
        changed_by -> Text,
        changed_at -> Timestamp,
    }
}

diesel::table! {
    data_sharing_agreements (id) {
        id -> Text,
        custodian -> Text,
        recipient -> Text,
        purposes -> Text,
        classes -> Text,
        period_start -> Nullable<Timestamp>,
        period_end -> Nullable<Timestamp>,
        status -> Text,
        version -> BigInt,
        change_seq -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    consent_change_seq (id) {
        id -> Integer,
        seq -> BigInt,
    }
}

diesel::table! {
    consent_subject_changes (change_seq, person_id) {
        change_seq -> BigInt,
        person_id -> Text,
    }
}

diesel::table! {
    audit_alerts (id) {
        id -> Text,
        rule -> Text,
        dedupe_key -> Text,
        agent -> Nullable<Text>,
        patient_id -> Nullable<Text>,
        first_seq -> BigInt,
        last_seq -> BigInt,
        detail -> Text,
        created_at -> Timestamp,
        status -> Text,
        ack_by -> Nullable<Text>,
        ack_note -> Nullable<Text>,
        ack_at -> Nullable<Timestamp>,
        webhook_state -> Text,
        webhook_attempts -> Integer,
        next_attempt_at -> Timestamp,
    }
}

diesel::table! {
    audit_alert_cursor (id) {
        id -> Integer,
        last_seq -> BigInt,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    audit_flagged_patients (patient_id) {
        patient_id -> Text,
        note -> Text,
        flagged_by -> Text,
        flagged_at -> Timestamp,
    }
}

diesel::table! {
    doc_references (id) {
        id -> Text,
        custodian_id -> Text,
        custodian_doc_id -> Text,
        patient_record_id -> Text,
        person_id -> Text,
        type_code -> Text,
        category_code -> Text,
        doc_date -> Timestamp,
        author_id -> Nullable<Text>,
        confidentiality -> Text,
        status -> Text,
        replaces -> Nullable<Text>,
        version -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    doc_contents (document_id) {
        document_id -> Text,
        sensitivity -> Text,
        content_type -> Text,
        content_size -> BigInt,
        sm3_hash -> Text,
        location -> Text,
        resource -> Text,
    }
}

diesel::table! {
    doc_event_counter (id) {
        id -> Integer,
        last_seq -> BigInt,
    }
}

diesel::table! {
    doc_events (seq) {
        seq -> BigInt,
        kind -> Text,
        document_id -> Nullable<Text>,
        person_id -> Nullable<Text>,
        type_code -> Nullable<Text>,
        custodian_id -> Nullable<Text>,
        detail -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    doc_subscriptions (id) {
        id -> Text,
        owner_id -> Text,
        topic -> Text,
        filter_person -> Nullable<Text>,
        filter_type -> Nullable<Text>,
        endpoint -> Text,
        status -> Text,
        resource -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    doc_deliveries (subscription_id, event_seq) {
        subscription_id -> Text,
        event_seq -> BigInt,
        status -> Text,
        attempts -> Integer,
        next_attempt_at -> Timestamp,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamp>,
        last_error -> Nullable<Text>,
        delivered_at -> Nullable<Timestamp>,
        created_at -> Timestamp,
    }
}

diesel::table! {
    encounters (id) {
        id -> Text,
        institution_id -> Text,
        institution_encounter_id -> Text,
        patient_record_id -> Text,
        status -> Text,
        class_code -> Text,
        period_start -> Timestamp,
        period_end -> Nullable<Timestamp>,
        resource -> Text,
        version -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    practitioners (id) {
        id -> Text,
        institution_id -> Text,
        identifier_value -> Text,
        family -> Text,
        given -> Text,
        surname_key -> Text,
        address_key -> Nullable<Text>,
        resource -> Text,
        version -> BigInt,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::joinable!(doc_contents -> doc_references (document_id));
diesel::allow_tables_to_appear_in_same_query!(doc_references, doc_contents);
diesel::allow_tables_to_appear_in_same_query!(encounters, empi_links);
diesel::allow_tables_to_appear_in_same_query!(empi_links, empi_source_records);
diesel::allow_tables_to_appear_in_same_query!(empi_blocking_keys, empi_source_records);
diesel::allow_tables_to_appear_in_same_query!(empi_blocking_keys, empi_links);

diesel::table! {
    audit_archives (first_seq) {
        first_seq -> BigInt,
        month -> Text,
        last_seq -> BigInt,
        record_count -> BigInt,
        anchor_prev_hash -> Text,
        last_hash -> Text,
        file_name -> Text,
        file_sm3 -> Text,
        archived_at -> Timestamp,
        key_id -> Text,
        signature -> Text,
    }
}
