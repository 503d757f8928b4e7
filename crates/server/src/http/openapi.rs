//! `GET /openapi.json` (§11.4): an OpenAPI 3.1 document of every endpoint under both prefixes, built
//! from the route table ([`super::routes`]) that also builds the router. The body schemas are derived
//! from the wire model's types (`tether-api`, `utoipa::ToSchema`); none is written here.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use utoipa::openapi::path::{OperationBuilder, ParameterBuilder, ParameterIn, ParameterStyle};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, Type,
};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, Paths,
    Ref, RefOr, Required, ResponseBuilder, ResponsesBuilder,
};

use super::routes::{self, Access, At, Body, Endpoint, Param, Returns, Shape, Ty, Verb};
use crate::dialect::Dialect;
use crate::error::ApiError;
use tether_api as api;

/// `GET /openapi.json`. The document depends only on the route table, so it is rendered once, and
/// every answer shares that one copy: the route is public, and a client that asks for it many times
/// and reads nothing must not make the server hold a copy per ask.
pub async fn serve() -> Response {
    static JSON: OnceLock<Result<Bytes, String>> = OnceLock::new();
    let rendered = JSON.get_or_init(|| {
        document()
            .to_json()
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    });
    match rendered {
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
    for dialect in Dialect::ALL {
        for endpoint in &api {
            let path = format!("{}{}", dialect.prefix(), endpoint.path);
            add(&mut paths, endpoint, path, Some(dialect));
        }
    }
    let ops = routes::ops();
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
    for (name, schema) in schema_components(ops.iter().chain(&api)) {
        components = components.schema(name, schema);
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
                    .content("application/json", json_content(reference(&schema)))
                    .build(),
            ));
        }
    }
    let mut responses = ResponsesBuilder::new();
    responses = match endpoint.returns {
        Returns::Json(schema) => responses.response("200", ok_json(reference(&schema))),
        Returns::List(schema) => responses.response("200", ok_json(page_reference(&schema))),
        Returns::JsonOrNull(schema) => responses.response(
            "200",
            ok_json(
                OneOfBuilder::new()
                    .item(reference(&schema))
                    .item(ObjectBuilder::new().schema_type(Type::Null))
                    .description(Some("The item, or the JSON literal `null` when there is none."))
                    .into(),
            ),
        ),
        Returns::JsonOr202(ok, accepted) => responses
            .response("200", ok_json(reference(&ok)))
            .response(
                "202",
                ResponseBuilder::new()
                    .description("Accepted")
                    .content("application/json", json_content(reference(&accepted)))
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
                    ContentBuilder::new()
                        .schema(Some(reference(&routes::shape::<api::Event>())))
                        .build(),
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
                .content("application/json", json_content(reference(&routes::shape::<api::ErrorEnvelope>())))
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
                .content(
                    "application/json",
                    json_content(reference(&routes::shape::<api::ErrorEnvelope>())),
                )
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
        Ty::OneOf(words) => ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(words.iter().copied()))
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

fn reference(shape: &Shape) -> RefOr<Schema> {
    Ref::from_schema_name((shape.name)()).into()
}

fn page_reference(shape: &Shape) -> RefOr<Schema> {
    Ref::from_schema_name(page_name(shape)).into()
}

fn page_name(shape: &Shape) -> String {
    format!("{}List", (shape.name)())
}

fn string() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).into()
}

fn timestamp() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .into()
}

fn any_object() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(true)))
        .into()
}

/// Every shape an endpoint reads or answers with.
fn shapes(endpoint: &Endpoint) -> Vec<(Shape, bool)> {
    let mut out = Vec::new();
    match endpoint.body {
        Body::None => {}
        Body::Optional(s) | Body::Required(s) => out.push((s, false)),
    }
    match endpoint.returns {
        Returns::Json(s) | Returns::JsonOrNull(s) => out.push((s, false)),
        Returns::List(s) => out.push((s, true)),
        Returns::JsonOr202(a, b) => out.extend([(a, false), (b, false)]),
        Returns::EventStream => out.push((routes::shape::<api::Event>(), false)),
        Returns::Text | Returns::AnyJson | Returns::File => {}
    }
    out
}

/// The component schemas: every type the route table names (and the types those refer to), a list
/// page of each listed type, and the error envelope. Each comes from its `tether-api` type.
fn schema_components<'a>(
    endpoints: impl Iterator<Item = &'a Endpoint>,
) -> Vec<(String, RefOr<Schema>)> {
    let mut all: Vec<(String, RefOr<Schema>)> = Vec::new();
    let error = routes::shape::<api::ErrorEnvelope>();
    let mut wanted = vec![(error, false)];
    for endpoint in endpoints {
        wanted.extend(shapes(endpoint));
    }
    for (shape, listed) in wanted {
        all.push(((shape.name)(), (shape.schema)()));
        (shape.dependencies)(&mut all);
        if listed {
            all.push((page_name(&shape), (shape.page)()));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    all.retain(|(name, _)| seen.insert(name.clone()));
    all
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
