//! Baseline for load benchmarks: a bare actix-web server with one JSON route and no
//! middleware, database or state. `cargo run --release -p yiqiao --example bare_actix -- 127.0.0.1:18090`

use actix_web::{App, HttpResponse, HttpServer, web};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18090".to_string());
    HttpServer::new(|| {
        App::new().route(
            "/fhir/Organization/{id}",
            web::get().to(|id: web::Path<String>| async move {
                HttpResponse::Ok().json(
                    serde_json::json!({ "resourceType": "Organization", "id": id.into_inner() }),
                )
            }),
        )
    })
    .bind(addr)?
    .run()
    .await
}
