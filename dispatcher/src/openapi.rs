//! The hand-written OpenAPI 3 document served at `/openapi.json` (service-contract §2–§4).
//!
//! The input schema is built from the same constants `job::validate` enforces, so the document and
//! the validator cannot drift apart on limits, presets or per-kind step ranges.

use serde_json::{json, Value};

use fleet::job::{EndpointKind, DEFAULT_SIZE, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, SIZE_PRESETS};

/// The input properties in the order of the contract's table, which forms (the playground) follow.
pub const FIELD_ORDER: [&str; 9] = [
    "prompt",
    "negative_prompt",
    "image_size",
    "num_inference_steps",
    "seed",
    "guidance_scale",
    "enable_safety_checker",
    "num_images",
    "output_format",
];

/// The input schema of one endpoint kind (JSON Schema as OpenAPI 3.1 embeds it).
pub fn input_schema(kind: EndpointKind) -> Value {
    let presets: Vec<&str> = SIZE_PRESETS.iter().map(|(name, _)| *name).collect();
    let negative = match kind {
        EndpointKind::Base => "What the image should not contain.",
        EndpointKind::Sprint => "Accepted for compatibility; Sana-Sprint ignores it.",
    };
    let mut schema = json!({
        "type": "object",
        "title": format!("{}Input", title(kind)),
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                       "description": "The prompt to generate an image from (non-empty after trimming)."},
            "negative_prompt": {"type": "string", "default": "", "maxLength": MAX_PROMPT_CHARS, "description": negative},
            "image_size": {
                "description": "A preset name or a custom size; generated at the nearest 1024-px aspect bucket, then resized and centre-cropped.",
                "default": {"width": DEFAULT_SIZE.width, "height": DEFAULT_SIZE.height},
                "anyOf": [
                    {"type": "string", "enum": presets},
                    {"$ref": "#/components/schemas/ImageSize"}
                ]
            },
            "num_inference_steps": {"type": "integer", "default": kind.default_steps(), "minimum": 1, "maximum": kind.max_steps()},
            "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_SEED}, {"type": "null"}],
                     "description": "Random when absent; the seed used is returned."},
            "guidance_scale": {"type": "number", "default": 5.0, "minimum": 0.0, "maximum": 20.0},
            "enable_safety_checker": {"type": "boolean", "default": true},
            "num_images": {"type": "integer", "default": 1, "minimum": 1, "maximum": 4},
            "output_format": {"type": "string", "enum": ["jpeg", "png"], "default": "jpeg"}
        }
    });
    // JSON objects have no order (serde_json keeps keys sorted); fal's schemas carry the form order here.
    schema["x-fal-order-properties"] = json!(FIELD_ORDER);
    if kind == EndpointKind::Sprint {
        // Accepted and ignored: clients (the playground) leave it out of their forms.
        schema["properties"]["negative_prompt"]["x-fleet-ignored"] = json!(true);
    }
    schema
}

fn title(kind: EndpointKind) -> &'static str {
    match kind {
        EndpointKind::Base => "Sana",
        EndpointKind::Sprint => "SanaSprint",
    }
}

fn submit_op(kind: EndpointKind) -> Value {
    json!({
        "operationId": format!("submit_{}", kind.as_str()),
        "summary": format!("Queue a {} request", title(kind)),
        "parameters": [
            {"name": "fal_webhook", "in": "query", "required": false, "schema": {"type": "string", "format": "uri"},
             "description": "URL that receives the result as a POST when the request finishes."},
            {"name": "X-Fal-Queue-Priority", "in": "header", "required": false, "schema": {"type": "string", "enum": ["normal", "low"]}},
            {"name": "X-Fal-Request-Timeout", "in": "header", "required": false, "schema": {"type": "number"},
             "description": "Seconds the request may wait before it starts; afterwards it fails with request_timeout (504)."}
        ],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}Input", title(kind))}}}},
        "responses": {
            "200": {"description": "Queued", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/QueueStatus"}}}},
            "401": {"description": "Missing or unknown API key"},
            "422": {"description": "Validation error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
        }
    })
}

/// The whole document, with paths under `/{owner}/{app}`.
pub fn document(owner: &str, app: &str) -> Value {
    let base = format!("/{owner}/{app}");
    let id_param =
        json!({"name": "request_id", "in": "path", "required": true, "schema": {"type": "string"}});
    let status_schema = json!({"$ref": "#/components/schemas/QueueStatus"});
    json!({
        "openapi": "3.1.0",
        "info": {"title": format!("{owner}/{app}"), "version": env!("CARGO_PKG_VERSION"),
                 "description": "Sana and Sana-Sprint text-to-image behind fal's queue API."},
        "components": {
            "securitySchemes": {"Key": {"type": "apiKey", "in": "header", "name": "Authorization",
                                        "description": "`Key <api key>`; required when the server has keys configured."}},
            "schemas": {
                "SanaInput": input_schema(EndpointKind::Base),
                "SanaSprintInput": input_schema(EndpointKind::Sprint),
                "ImageSize": {"type": "object", "required": ["width", "height"], "properties": {
                    "width": {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_SIDE},
                    "height": {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_SIDE}}},
                "Image": {"type": "object", "properties": {
                    "url": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
                    "content_type": {"type": "string"}, "file_name": {"type": "string"}, "file_size": {"type": "integer"}}},
                "Output": {"type": "object", "required": ["images", "seed"], "properties": {
                    "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
                    "seed": {"type": "integer"},
                    "has_nsfw_concepts": {"type": "array", "items": {"type": "boolean"}},
                    "prompt": {"type": "string"},
                    "timings": {"type": "object", "additionalProperties": {"type": "number"}}}},
                "QueueStatus": {"type": "object", "required": ["status", "request_id"], "properties": {
                    "status": {"type": "string", "enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]},
                    "request_id": {"type": "string"},
                    "response_url": {"type": "string"}, "status_url": {"type": "string"}, "cancel_url": {"type": "string"},
                    "queue_position": {"type": "integer"},
                    "logs": {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "null"}]},
                    "metrics": {"type": "object", "properties": {"inference_time": {"type": ["number", "null"]}}},
                    "error": {"type": "string"}, "error_type": {"type": "string"}}},
                "HTTPValidationError": {"type": "object", "properties": {"detail": {"type": "array", "items": {
                    "type": "object", "properties": {"loc": {"type": "array", "items": {"type": "string"}},
                    "msg": {"type": "string"}, "type": {"type": "string"}, "input": {}}}}}},
                "RequestError": {"type": "object", "properties": {"detail": {"type": "string"}, "error_type": {"type": "string",
                    "enum": ["request_timeout", "runner_server_error", "internal_error", "client_cancelled", "bad_request", "validation_error", "storage_error"]}}}
            }
        },
        "security": [{"Key": []}, {}],
        "paths": {
            base.clone(): {"post": submit_op(EndpointKind::Base)},
            format!("{base}/sprint"): {"post": submit_op(EndpointKind::Sprint)},
            format!("{base}/requests/{{request_id}}/status"): {"get": {
                "operationId": "status", "parameters": [id_param.clone(),
                    {"name": "logs", "in": "query", "required": false, "schema": {"type": "string"}, "description": "`1`/`true` to include logs"}],
                "responses": {"200": {"description": "COMPLETED", "content": {"application/json": {"schema": status_schema.clone()}}},
                              "202": {"description": "IN_QUEUE or IN_PROGRESS", "content": {"application/json": {"schema": status_schema.clone()}}},
                              "404": {"description": "Unknown request"}}}},
            format!("{base}/requests/{{request_id}}/status/stream"): {"get": {
                "operationId": "status_stream", "parameters": [id_param.clone()],
                "responses": {"200": {"description": "Server-sent events, one status body each, until COMPLETED",
                                      "content": {"text/event-stream": {"schema": status_schema}}}}}},
            format!("{base}/requests/{{request_id}}"): {"get": {
                "operationId": "result", "parameters": [id_param.clone()],
                "responses": {"200": {"description": "The output; header x-fal-billable-units",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Output"}}}},
                              "400": {"description": "Not finished yet (`Request is still in progress`), or bad_request"}, "404": {"description": "Unknown request"},
                              "422": {"description": "validation_error"}, "499": {"description": "client_cancelled"},
                              "500": {"description": "runner_server_error, internal_error or storage_error",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RequestError"}}}},
                              "504": {"description": "request_timeout"}}}},
            format!("{base}/requests/{{request_id}}/cancel"): {"put": {
                "operationId": "cancel", "parameters": [id_param],
                "responses": {"202": {"description": "CANCELLATION_REQUESTED"}, "400": {"description": "ALREADY_COMPLETED"},
                              "404": {"description": "NOT_FOUND"}}}},
            format!("{base}/playground"): {"get": {
                "operationId": "playground", "security": [{}],
                "summary": "A page to try the API in a browser (its form is built from this document)",
                "responses": {"200": {"description": "The page", "content": {"text/html": {}}}}}},
            "/health": {"get": {"operationId": "health", "responses": {"200": {"description": "Serving"}}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {"200": {"description": "Prometheus text format"}}}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_carries_the_validator_limits() {
        let doc = document("local", "sana");
        let sprint = &doc["components"]["schemas"]["SanaSprintInput"]["properties"];
        assert_eq!(sprint["num_inference_steps"]["default"], 2);
        assert_eq!(sprint["num_inference_steps"]["maximum"], 20);
        let base = &doc["components"]["schemas"]["SanaInput"]["properties"];
        assert_eq!(base["num_inference_steps"]["maximum"], 50);
        assert_eq!(
            base["image_size"]["anyOf"][0]["enum"]
                .as_array()
                .map(Vec::len),
            Some(6)
        );
        assert!(doc["paths"]["/local/sana/sprint"]["post"].is_object());
        assert!(doc["paths"]["/local/sana/requests/{request_id}/status"]["get"].is_object());
        assert!(doc["paths"]["/local/sana/playground"]["get"].is_object());
    }

    #[test]
    fn the_field_order_names_every_property_once() {
        for kind in EndpointKind::ALL {
            let schema = input_schema(kind);
            let mut listed: Vec<&str> = schema["x-fal-order-properties"]
                .as_array()
                .expect("an order")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let mut properties: Vec<&str> = schema["properties"]
                .as_object()
                .expect("properties")
                .keys()
                .map(String::as_str)
                .collect();
            listed.sort_unstable();
            properties.sort_unstable();
            assert_eq!(listed, properties);
        }
    }

    #[test]
    fn only_sprint_marks_the_negative_prompt_ignored() {
        let doc = document("local", "sana");
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["SanaSprintInput"]["properties"]["negative_prompt"]["x-fleet-ignored"],
            true
        );
        assert!(schemas["SanaInput"]["properties"]["negative_prompt"]
            .get("x-fleet-ignored")
            .is_none());
    }
}
