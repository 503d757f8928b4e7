//! `GET /openapi.json` (§11.4): an OpenAPI 3.1 document of every endpoint under both prefixes, built
//! from the route table ([`super::routes`]) that also builds the router.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{OperationBuilder, ParameterBuilder, ParameterIn, ParameterStyle};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, Paths,
    Ref, RefOr, Required, ResponseBuilder, ResponsesBuilder,
};

use super::routes::{self, Access, At, Body, Endpoint, Param, Returns, Ty, Verb};
use crate::dialect::Dialect;
use crate::error::ApiError;
use crate::service::{agents, environments, sessions, tokens};
use tether_core::metadata;

/// `GET /openapi.json`. The document depends only on the route table, so it is rendered once.
pub async fn serve() -> Response {
    static JSON: OnceLock<Result<String, String>> = OnceLock::new();
    match JSON.get_or_init(|| document().to_json().map_err(|e| e.to_string())) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        Err(e) => {
            ApiError::internal(format!("cannot render the OpenAPI document: {e}")).into_response()
        }
    }
}

/// The whole document: the operations surface, then every API endpoint under each dialect's prefix.
pub fn document() -> OpenApi {
    let mut paths = Paths::new();
    for endpoint in routes::ops() {
        add(&mut paths, &endpoint, endpoint.path.to_owned(), None);
    }
    let api = routes::api();
    let mut lists: Vec<&'static str> = Vec::new();
    for dialect in Dialect::ALL {
        for endpoint in &api {
            let path = format!("{}{}", dialect.prefix(), endpoint.path);
            add(&mut paths, endpoint, path, Some(dialect));
        }
    }
    for endpoint in &api {
        if let Returns::List(item) = endpoint.returns {
            if !lists.contains(&item) {
                lists.push(item);
            }
        }
    }
    let mut components = ComponentsBuilder::new()
        .security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <token>` — an admin token (`tth_adm_…`), an \
                         environment key (`tth_env_…`) or a work item's session token (`tth_ses_…`).",
                    ))
                    .build(),
            ),
        )
        .security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "x-api-key",
                "The same tokens as `x-api-key: <token>`; accepted under /v1 only (under \
                 /api/v1/cloud it is a 401).",
            ))),
        );
    for (name, schema) in schemas() {
        components = components.schema(name, schema);
    }
    for item in lists {
        components = components.schema(format!("{item}List"), list_of(item));
    }
    let tags = [
        (
            "operations",
            "Health, readiness, metrics and this document (no prefix).",
        ),
        ("environments", "Environments (§7.1)."),
        (
            "work",
            "The self-hosted work queue (§6) and what Tether adds to it (§11.2).",
        ),
        ("agents", "Agents (§12.1)."),
        ("sessions", "Sessions (§12.2)."),
        ("events", "Session events and their live stream (§12.3)."),
        ("credentials", "Admin tokens and environment keys (§11.1)."),
    ]
    .into_iter()
    .map(|(name, description)| {
        TagBuilder::new()
            .name(name)
            .description(Some(description))
            .build()
    });
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Tether")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A control plane for agent sessions on self-hosted compute. One API under two \
                     prefixes: `/api/v1/cloud` (the Qoder Cloud Agents dialect) and `/v1` (the \
                     Claude Managed Agents dialect); docs/dialects.md lists where they differ. Every \
                     API call takes `Authorization: Bearer <token>`; `/v1` also takes `x-api-key`. \
                     Errors are `{\"type\":\"error\",\"request_id\",\"error\":{\"type\",\"message\",…}}`.",
                ))
                .build(),
        )
        .paths(paths)
        .components(Some(components.build()))
        .tags(Some(tags))
        .build()
}

fn add(paths: &mut Paths, endpoint: &Endpoint, path: String, dialect: Option<Dialect>) {
    let operation_id = match dialect {
        Some(d) => format!("{}_{}", d.name(), endpoint.operation),
        None => endpoint.operation.to_owned(),
    };
    let mut description = endpoint.access.describe().to_owned();
    if let Some(d) = dialect {
        description.push_str(&format!(" Dialect: {} (`{}`).", d.name(), d.prefix()));
    }
    let mut op = OperationBuilder::new()
        .operation_id(Some(operation_id))
        .summary(Some(endpoint.summary))
        .description(Some(description))
        .tag(endpoint.tag);
    for name in path_params(endpoint.path) {
        op = op.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(path_param_doc(name)))
                .schema(Some(string())),
        );
    }
    for param in &endpoint.params {
        op = op.parameter(parameter(param, dialect));
    }
    match endpoint.body {
        Body::None => {}
        Body::Optional(schema) | Body::Required(schema) => {
            let required = matches!(endpoint.body, Body::Required(_));
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(if required {
                        Required::True
                    } else {
                        Required::False
                    }))
                    .description(Some(if required {
                        "A JSON object; `Content-Type` may be omitted."
                    } else {
                        "Optional: no body, an empty body and `{}` mean the same."
                    }))
                    .content("application/json", json_content(reference(schema)))
                    .build(),
            ));
        }
    }
    let mut responses = ResponsesBuilder::new();
    responses = match endpoint.returns {
        Returns::Json(schema) => responses.response("200", ok_json(reference(schema))),
        Returns::List(schema) => {
            responses.response("200", ok_json(reference(&format!("{schema}List"))))
        }
        Returns::JsonOrNull(schema) => responses.response(
            "200",
            ok_json(
                OneOfBuilder::new()
                    .item(reference(schema))
                    .item(ObjectBuilder::new().schema_type(Type::Null))
                    .description(Some("The item, or the JSON literal `null` when there is none."))
                    .into(),
            ),
        ),
        Returns::JsonOr202(ok, accepted) => responses
            .response("200", ok_json(reference(ok)))
            .response(
                "202",
                ResponseBuilder::new()
                    .description("Accepted")
                    .content("application/json", json_content(reference(accepted)))
                    .build(),
            ),
        Returns::EventStream => responses.response(
            "200",
            ResponseBuilder::new()
                .description(
                    "Server-Sent Events: each frame has `id: evt_…`, `event: <type>` and `data: <the \
                     event as JSON>`; a comment line every 15 s keeps the connection alive.",
                )
                // The schema is that of each frame's `data` (what SSE-aware tools validate): an event.
                .content(
                    "text/event-stream",
                    ContentBuilder::new().schema(Some(reference("Event"))).build(),
                )
                .build(),
        ),
        Returns::Text => responses.response(
            "200",
            ResponseBuilder::new()
                .description("OK")
                .content("text/plain", ContentBuilder::new().schema(Some(string())).build())
                .build(),
        ),
        Returns::AnyJson => responses.response("200", ok_json(any_object())),
        Returns::File => responses.response(
            "200",
            ResponseBuilder::new()
                .description("The file; `304` when `If-None-Match` names its `ETag`.")
                .content("text/html", ContentBuilder::new().schema(Some(string())).build())
                .content("text/javascript", ContentBuilder::new().schema(Some(string())).build())
                .content("text/css", ContentBuilder::new().schema(Some(string())).build())
                .content("image/svg+xml", ContentBuilder::new().schema(Some(string())).build())
                .build(),
        )
        .response(
            "304",
            ResponseBuilder::new()
                .description("Not modified: `If-None-Match` names the file's current `ETag`.")
                .build(),
        )
        .response(
            "404",
            ResponseBuilder::new()
                .description("No such file of the dashboard, in the error envelope.")
                .content("application/json", json_content(reference("Error")))
                .build(),
        ),
    };
    if endpoint.access != Access::Public {
        responses = responses.response(
            "default",
            ResponseBuilder::new()
                .description(
                    "An error (400, 401, 403, 404, 409, 412, 500, 503), in the error envelope.",
                )
                .content("application/json", json_content(reference("Error")))
                .build(),
        );
    }
    op = op.responses(responses.build());
    let securities: Vec<SecurityRequirement> = match (endpoint.access, dialect) {
        (Access::Public, _) | (_, None) => Vec::new(),
        (_, Some(d)) => d
            .security_schemes()
            .iter()
            .map(|name| SecurityRequirement::new(*name, Vec::<String>::new()))
            .collect(),
    };
    op = op.securities(Some(securities));
    let method = match endpoint.verb {
        Verb::Get => HttpMethod::Get,
        Verb::Post => HttpMethod::Post,
        Verb::Delete => HttpMethod::Delete,
    };
    paths.add_path_operation(path, vec![method], op.build());
}

/// The `{name}` segments of a route path, in order.
pub fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn path_param_doc(name: &str) -> &'static str {
    match name {
        "environment_id" => "The environment (`env_…`).",
        "work_id" => "The work item (`work_…`).",
        "agent_id" => "The agent (`agent_…`).",
        "session_id" => "The session (`sess_…`).",
        "key_id" => "The environment key (`envkey_…`).",
        "token_id" => "The admin token's id.",
        "file" => "The file's name.",
        _ => "An id.",
    }
}

fn parameter(param: &Param, dialect: Option<Dialect>) -> utoipa::openapi::path::Parameter {
    let (name, location) = match param.at {
        At::Query => (param.name.to_owned(), ParameterIn::Query),
        At::Header => (param.name.to_owned(), ParameterIn::Header),
        At::WorkerHeader => (
            worker_header_name(dialect.unwrap_or(Dialect::Qoder)),
            ParameterIn::Header,
        ),
    };
    let schema: RefOr<Schema> = match param.ty {
        Ty::Integer => {
            let (min, max) = integer_bounds(param.name, dialect);
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(min)
                .maximum(max)
                .into()
        }
        Ty::String => string(),
        Ty::Boolean => ObjectBuilder::new().schema_type(Type::Boolean).into(),
        Ty::Timestamp => timestamp(),
        Ty::Strings => ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(Type::String))
            .into(),
    };
    let mut builder = ParameterBuilder::new()
        .name(name)
        .parameter_in(location)
        .required(Required::False)
        .description(Some(param.doc))
        .schema(Some(schema));
    if param.ty == Ty::Strings {
        builder = builder
            .style(Some(ParameterStyle::Form))
            .explode(Some(true));
    }
    builder.build()
}

/// The range the server accepts for an integer query parameter (values outside are a 400, except where
/// a parameter is clamped: then only the lower bound is given).
fn integer_bounds(name: &str, dialect: Option<Dialect>) -> (Option<i64>, Option<i64>) {
    let dialect = dialect.unwrap_or(Dialect::Qoder);
    match name {
        "limit" => (Some(1), Some(i64::from(dialect.max_list_limit()))),
        "block_ms" => (Some(1), Some(999)),
        "reclaim_older_than_ms" => (Some(dialect.min_reclaim_ms()), None),
        "version" => (Some(1), None),
        _ => (None, None),
    }
}

/// The dialect's preferred worker identity header, in its documented spelling.
fn worker_header_name(dialect: Dialect) -> String {
    let name = dialect.worker_headers()[0];
    name.split('-')
        .map(|part| match part {
            "id" => "ID".to_owned(),
            other => {
                let mut chars = other.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn ok_json(schema: RefOr<Schema>) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description("OK")
        .content("application/json", json_content(schema))
        .build()
}

fn json_content(schema: RefOr<Schema>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

// ----------------------------------------------------------------------------------------------- schemas

fn reference(name: &str) -> RefOr<Schema> {
    Ref::from_schema_name(name).into()
}

fn string() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).into()
}

fn nullable_string() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .into()
}

fn constant(value: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([value]))
        .into()
}

fn one_of_strings(values: &[&str]) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .into()
}

fn integer() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Integer).into()
}

fn boolean() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Boolean).into()
}

fn timestamp() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .into()
}

fn nullable_timestamp() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .into()
}

fn any_object() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(true)))
        .into()
}

fn nullable_object() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .into()
}

fn array_of(items: RefOr<Schema>) -> RefOr<Schema> {
    ArrayBuilder::new().items(items).into()
}

fn any_array() -> RefOr<Schema> {
    array_of(any_object())
}

/// An object with `fields` (`(name, schema, required)`); further members may appear (clients must
/// ignore what they do not know).
fn object(description: &str, fields: Vec<(&str, RefOr<Schema>, bool)>) -> RefOr<Schema> {
    let mut builder = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(description));
    for (name, schema, required) in fields {
        builder = builder.property(name, schema);
        if required {
            builder = builder.required(name);
        }
    }
    builder.into()
}

fn list_of(item: &str) -> RefOr<Schema> {
    object(
        "A page (§1.8). `next_page` is null on the last page; pass it back as `page` for the next.",
        vec![
            ("data", array_of(reference(item)), true),
            ("first_id", nullable_string(), true),
            ("last_id", nullable_string(), true),
            ("has_more", boolean(), true),
            ("next_page", nullable_string(), true),
        ],
    )
}

/// A name the server accepts: 1 to `max` characters, not all of them blank.
fn name(max: usize) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(r"\S"))
        .into()
}

/// A session title.
fn title() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(sessions::MAX_TITLE_CHARS))
        .into()
}

/// A metadata key (§1.9).
fn metadata_key() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(metadata::MAX_KEY_CHARS))
}

/// A complete metadata map as sent (§1.9).
fn metadata_map() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "At most 16 keys of 1 to 64 characters, values of at most 512.",
        ))
        .max_properties(Some(metadata::MAX_KEYS))
        .property_names(Some(metadata_key()))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(metadata::MAX_VALUE_CHARS)),
        ))
        .into()
}

fn schemas() -> Vec<(&'static str, RefOr<Schema>)> {
    let string_map = || -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
            .into()
    };
    let metadata_patch = || -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "Merge patch: a string sets a key, null deletes it, absent keys stay; the merged map \
                 keeps the limits of §1.9 (at most 16 keys).",
            ))
            .property_names(Some(metadata_key()))
            .additional_properties(Some(
                ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                    .max_length(Some(metadata::MAX_VALUE_CHARS)),
            ))
            .into()
    };
    let work_state = || one_of_strings(&["queued", "starting", "active", "stopping", "stopped"]);
    let model = || -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(object(
                "A model with settings.",
                vec![("id", string(), true)],
            ))
            .description(Some(
                "A model name or `{\"id\": …, …}`. Under /v1 a name is always shown as `{\"id\": name}`.",
            ))
            .into()
    };
    vec![
        (
            "Error",
            object(
                "The error envelope (§1.7).",
                vec![
                    ("type", constant("error"), true),
                    ("request_id", string(), true),
                    (
                        "error",
                        object(
                            "What went wrong.",
                            vec![
                                ("type", string(), true),
                                ("message", string(), true),
                                ("param", string(), false),
                                ("code", string(), false),
                                ("details", any_object(), false),
                            ],
                        ),
                        true,
                    ),
                ],
            ),
        ),
        (
            "Health",
            object("Process or store health.", vec![("status", string(), true), ("store", string(), false)]),
        ),
        (
            "Deleted",
            object(
                "What a delete leaves behind.",
                vec![
                    ("id", string(), true),
                    ("type", one_of_strings(&["environment_deleted", "session_deleted"]), true),
                ],
            ),
        ),
        (
            "EnvironmentConfig",
            object(
                "`{\"type\":\"self_hosted\", \"setup_script\"?}` owns a work queue; `cloud` (alias \
                 `managed`) is stored but never runs anything.",
                vec![
                    ("type", one_of_strings(&["self_hosted", "cloud", "managed"]), true),
                    ("setup_script", string(), false),
                    ("networking", any_object(), false),
                    ("packages", any_object(), false),
                ],
            ),
        ),
        (
            "Environment",
            object(
                "An environment (§2.1).",
                vec![
                    ("id", string(), true),
                    ("type", constant("environment"), true),
                    ("name", string(), true),
                    ("description", nullable_string(), true),
                    ("config", reference("EnvironmentConfig"), true),
                    ("metadata", string_map(), true),
                    ("scope", nullable_string(), false),
                    ("status", one_of_strings(&["ready", "archived"]), false),
                    ("archived", boolean(), false),
                    ("archived_at", nullable_timestamp(), true),
                    ("created_at", timestamp(), true),
                    ("updated_at", timestamp(), true),
                ],
            ),
        ),
        (
            "CreateEnvironment",
            object(
                "A new environment. `config` is required under /api/v1/cloud; under /v1 its absence \
                 means a cloud environment.",
                vec![
                    ("name", name(environments::MAX_NAME_CHARS), true),
                    ("description", string(), false),
                    ("config", reference("EnvironmentConfig"), false),
                    ("metadata", metadata_map(), false),
                    ("scope", string(), false),
                ],
            ),
        ),
        (
            "UpdateEnvironment",
            object(
                "A partial update; `config.type` cannot change.",
                vec![
                    ("name", name(environments::MAX_NAME_CHARS), false),
                    ("description", string(), false),
                    ("config", reference("EnvironmentConfig"), false),
                    ("metadata", metadata_patch(), false),
                ],
            ),
        ),
        (
            "WorkItem",
            object(
                "A work item (§2.3). `secret` is set on poll answers only.",
                vec![
                    ("id", string(), true),
                    ("type", constant("work"), true),
                    ("environment_id", string(), true),
                    (
                        "data",
                        object(
                            "What to serve.",
                            vec![("type", constant("session"), true), ("id", string(), true)],
                        ),
                        true,
                    ),
                    ("state", work_state(), true),
                    ("created_at", timestamp(), true),
                    ("acknowledged_at", nullable_timestamp(), true),
                    ("started_at", nullable_timestamp(), true),
                    ("latest_heartbeat_at", nullable_timestamp(), true),
                    ("stop_requested_at", nullable_timestamp(), true),
                    ("stopped_at", nullable_timestamp(), true),
                    ("metadata", string_map(), true),
                    (
                        "secret",
                        nullable_string(),
                        true,
                    ),
                    ("delivery_count", integer(), false),
                    ("requeue_count", integer(), false),
                ],
            ),
        ),
        (
            "WorkMetadataPatch",
            object("A metadata merge patch.", vec![("metadata", metadata_patch(), false)]),
        ),
        (
            "StopRequest",
            object(
                "`force: true` stops at once; otherwise a graceful stop (or its confirmation).",
                vec![(
                    "force",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::from_iter([Type::Boolean, Type::Null]))
                        .into(),
                    false,
                )],
            ),
        ),
        (
            "RequeueRequest",
            object(
                "Tether extension: why the item is requeued (kept in the history of both items, at most 500 characters).",
                vec![("reason", nullable_string(), false)],
            ),
        ),
        (
            "WorkHeartbeat",
            object(
                "A heartbeat's answer (§2.4); echo `last_heartbeat` as the next `expected_last_heartbeat`.",
                vec![
                    ("type", constant("work_heartbeat"), true),
                    ("last_heartbeat", timestamp(), true),
                    ("lease_extended", boolean(), true),
                    ("state", work_state(), true),
                    ("ttl_seconds", integer(), true),
                ],
            ),
        ),
        (
            "WorkQueueStats",
            object(
                "Queue statistics (§2.5, §11.3).",
                vec![
                    ("type", constant("work_queue_stats"), true),
                    ("depth", integer(), true),
                    ("pending", integer(), true),
                    ("oldest_queued_at", nullable_timestamp(), true),
                    ("workers_polling", integer(), true),
                    (
                        "states",
                        ObjectBuilder::new()
                            .schema_type(Type::Object)
                            .additional_properties(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                            .into(),
                        false,
                    ),
                ],
            ),
        ),
        (
            "WorkQueueStatsHistory",
            object(
                "Queue statistics of the last hour, oldest first. Every server samples the shared store \
                 on its own tick, so any server's answer covers the whole cluster; a server that started \
                 less than an hour ago has fewer samples.",
                vec![
                    ("type", constant("work_queue_stats_history"), true),
                    ("environment_id", string(), true),
                    ("interval_seconds", ObjectBuilder::new().schema_type(Type::Number).into(), true),
                    (
                        "data",
                        array_of(object(
                            "One sample.",
                            vec![
                                ("at", timestamp(), true),
                                ("depth", integer(), true),
                                ("pending", integer(), true),
                                ("starting", integer(), true),
                                ("active", integer(), true),
                                ("stopping", integer(), true),
                                ("workers_polling", integer(), true),
                            ],
                        )),
                        true,
                    ),
                ],
            ),
        ),
        (
            "WorkTransition",
            object(
                "One state change of a work item (§11.2).",
                vec![
                    ("type", constant("work_transition"), true),
                    ("at", timestamp(), true),
                    ("from", nullable_string(), true),
                    ("to", work_state(), true),
                    ("cause", string(), true),
                    ("worker_id", nullable_string(), true),
                    ("detail", nullable_string(), true),
                ],
            ),
        ),
        (
            "WorkHistory",
            object(
                "A page of a work item's history, oldest first (§11.2).",
                vec![
                    ("work_id", string(), true),
                    ("data", array_of(reference("WorkTransition")), true),
                    ("first_id", nullable_string(), true),
                    ("last_id", nullable_string(), true),
                    ("has_more", boolean(), true),
                    ("next_page", nullable_string(), true),
                    ("heartbeat_count", integer(), true),
                ],
            ),
        ),
        (
            "Workers",
            object(
                "Workers seen polling recently (§11.4).",
                vec![(
                    "data",
                    array_of(object(
                        "A worker.",
                        vec![
                            ("type", constant("worker"), true),
                            ("worker_id", string(), true),
                            ("last_poll_at", timestamp(), true),
                            ("items", any_array(), true),
                        ],
                    )),
                    true,
                )],
            ),
        ),
        (
            "Agent",
            object(
                "An agent at one version (§12.1).",
                vec![
                    ("id", string(), true),
                    ("type", constant("agent"), true),
                    ("name", string(), true),
                    ("model", model(), true),
                    ("description", nullable_string(), true),
                    ("system", nullable_string(), true),
                    ("tools", any_array(), true),
                    ("skills", any_array(), true),
                    ("mcp_servers", any_array(), true),
                    ("execution_identity", nullable_object(), true),
                    ("metadata", string_map(), true),
                    ("version", integer(), true),
                    ("created_at", timestamp(), true),
                    ("updated_at", timestamp(), true),
                    ("archived_at", nullable_timestamp(), true),
                ],
            ),
        ),
        (
            "CreateAgent",
            object(
                "A new agent.",
                vec![
                    ("name", name(agents::MAX_NAME_CHARS), true),
                    ("model", model(), true),
                    ("description", string(), false),
                    ("system", string(), false),
                    ("tools", any_array(), false),
                    ("skills", any_array(), false),
                    ("mcp_servers", any_array(), false),
                    ("execution_identity", any_object(), false),
                    ("metadata", metadata_map(), false),
                ],
            ),
        ),
        (
            "UpdateAgent",
            object(
                "A partial update, making a new version. `version`, when given, must be the current \
                 version (else 409 and nothing changes).",
                vec![
                    ("version", integer(), false),
                    ("name", name(agents::MAX_NAME_CHARS), false),
                    ("model", model(), false),
                    ("description", string(), false),
                    ("system", string(), false),
                    ("tools", any_array(), false),
                    ("skills", any_array(), false),
                    ("mcp_servers", any_array(), false),
                    ("execution_identity", any_object(), false),
                    ("metadata", metadata_patch(), false),
                ],
            ),
        ),
        (
            "Session",
            object(
                "A session (§2.2, §12.2); `agent` is the agent at the version the session uses.",
                vec![
                    ("id", string(), true),
                    ("type", constant("session"), true),
                    ("agent", reference("Agent"), true),
                    ("agent_id", string(), true),
                    ("environment_id", string(), true),
                    ("status", one_of_strings(&["idle", "running", "rescheduling", "terminated"]), true),
                    ("turn_status", string(), false),
                    ("title", nullable_string(), true),
                    ("metadata", string_map(), true),
                    ("environment_variables", string_map(), true),
                    ("resources", any_array(), true),
                    ("vault_ids", any_array(), true),
                    ("memory_store_ids", any_array(), false),
                    ("deployment_id", nullable_string(), false),
                    ("outcome_evaluations", any_array(), true),
                    ("stats", any_object(), true),
                    ("usage", any_object(), true),
                    ("created_at", timestamp(), true),
                    ("updated_at", timestamp(), true),
                    ("archived_at", nullable_timestamp(), true),
                ],
            ),
        ),
        (
            "CreateSession",
            object(
                "A new session.",
                vec![
                    (
                        "agent",
                        OneOfBuilder::new()
                            .item(ObjectBuilder::new().schema_type(Type::String))
                            .item(object(
                                "An agent at a version.",
                                vec![
                                    ("type", constant("agent"), true),
                                    ("id", string(), true),
                                    ("version", integer(), false),
                                ],
                            ))
                            .into(),
                        true,
                    ),
                    ("environment_id", string(), true),
                    ("title", title(), false),
                    ("metadata", metadata_map(), false),
                    ("environment_variables", string_map(), false),
                    ("initial_events", any_array(), false),
                    ("resources", any_array(), false),
                    ("budget", any_object(), false),
                ],
            ),
        ),
        (
            "UpdateSession",
            object(
                "A partial update.",
                vec![("title", title(), false), ("metadata", metadata_patch(), false)],
            ),
        ),
        (
            "Canceling",
            object(
                "A cancel that interrupted a running turn.",
                vec![
                    ("id", string(), true),
                    ("type", constant("session"), true),
                    ("status", constant("canceling"), true),
                ],
            ),
        ),
        (
            "Event",
            object(
                "A session event (§12.3): `id`, `type`, `processed_at` and the fields of its type.",
                vec![
                    ("id", string(), true),
                    ("type", string(), true),
                    ("processed_at", timestamp(), true),
                ],
            ),
        ),
        (
            "PostEvents",
            object(
                "1 to 100 events, each `{\"type\": …, …}`.",
                vec![(
                    "events",
                    ArrayBuilder::new()
                        .items(object("An event to append.", vec![("type", string(), true)]))
                        .min_items(Some(1))
                        .max_items(Some(tether_core::events::MAX_EVENTS_PER_BATCH))
                        .into(),
                    true,
                )],
            ),
        ),
        (
            "PostedEvents",
            object(
                "The events as stored.",
                vec![("data", array_of(reference("Event")), true)],
            ),
        ),
        (
            "Credential",
            object(
                "An admin token or environment key, without its secret.",
                vec![
                    ("id", string(), true),
                    ("type", one_of_strings(&["token", "environment_key"]), true),
                    ("name", nullable_string(), true),
                    ("environment_id", nullable_string(), true),
                    ("hint", string(), true),
                    ("created_at", timestamp(), true),
                    ("revoked_at", nullable_timestamp(), true),
                ],
            ),
        ),
        (
            "NewCredential",
            object(
                "A credential just minted; `token` is its secret, shown this once.",
                vec![
                    ("id", string(), true),
                    ("type", one_of_strings(&["token", "environment_key"]), true),
                    ("token", string(), true),
                    ("hint", string(), true),
                    ("created_at", timestamp(), true),
                ],
            ),
        ),
        (
            "CreateCredential",
            object(
                "A new credential; without `name` it has none.",
                vec![("name", name(tokens::MAX_CREDENTIAL_NAME_CHARS), false)],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_header_names_are_spelled_as_documented() {
        assert_eq!(worker_header_name(Dialect::Qoder), "Worker-ID");
        assert_eq!(
            worker_header_name(Dialect::Anthropic),
            "Anthropic-Worker-ID"
        );
    }

    #[test]
    fn every_referenced_schema_is_defined() {
        let doc = serde_json::to_value(document()).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..3]), Some("3.1"));
        let defined = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for piece in text.split("\"#/components/schemas/").skip(1) {
            let name = &piece[..piece.find('"').unwrap()];
            assert!(
                defined.contains_key(name),
                "{name} is referenced but not defined"
            );
        }
    }

    #[test]
    fn both_prefixes_document_the_same_operations() {
        let doc = serde_json::to_value(document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for endpoint in routes::api() {
            for dialect in Dialect::ALL {
                let path = format!("{}{}", dialect.prefix(), endpoint.path);
                let method = endpoint.verb.as_str().to_ascii_lowercase();
                let op = &paths[&path][&method];
                assert!(op.is_object(), "{method} {path} is not documented");
                let schemes: Vec<String> = op["security"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|r| r.as_object().unwrap().keys().cloned())
                    .collect();
                assert!(schemes.contains(&"bearer".to_owned()), "{method} {path}");
                assert_eq!(
                    schemes.contains(&"api_key".to_owned()),
                    dialect.accepts_x_api_key(),
                    "{method} {path}"
                );
            }
        }
    }
}
