//! Schemas serde's types cannot express: the limits of §1.9 on metadata as sent.

use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};

/// The most keys a metadata map may hold, and the longest key and value (§1.9).
const MAX_KEYS: usize = 16;
const MAX_KEY_CHARS: usize = 64;
const MAX_VALUE_CHARS: usize = 512;

fn key() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_KEY_CHARS))
}

/// A complete metadata map as sent.
pub fn metadata_map() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "At most 16 keys of 1 to 64 characters, values of at most 512.",
        ))
        .max_properties(Some(MAX_KEYS))
        .property_names(Some(key()))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_VALUE_CHARS)),
        ))
        .into()
}

/// A metadata merge patch: a string sets a key, null deletes it, absent keys stay; the merged map
/// keeps the limits of §1.9.
pub fn metadata_patch() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Merge patch: a string sets a key, null deletes it, absent keys stay; the merged map \
             keeps the limits of §1.9 (at most 16 keys).",
        ))
        .property_names(Some(key()))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .max_length(Some(MAX_VALUE_CHARS)),
        ))
        .into()
}
