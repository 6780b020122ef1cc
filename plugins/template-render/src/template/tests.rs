use super::*;

fn data() -> Arc<Data> {
    let consul = r#"{"id":"web-1","service":"web","address":"10.0.0.1","port":8080,"tags":["v2"],"meta":{"zone":"a"},"node":"n1","status":"passing"}"#;
    let consul_warn = r#"{"id":"web-2","service":"web","address":"10.0.0.2","port":8080,"tags":[],"meta":{},"node":"n2","status":"critical"}"#;
    let nacos = r#"{"service":"api","ip":"10.1.0.1","port":9000,"healthy":true,"weight":2.0,"cluster":"DEFAULT","instance_id":"i-1","metadata":{"v":"1"}}"#;
    Arc::new(
        [
            ("app/port", "8080"),
            ("app/host", "example.org"),
            ("db/b", "2"),
            ("db/a", "1"),
            ("db/nested/c", "3"),
            ("cfg/app.json", r#"{"name": "web", "replicas": [1, 2]}"#),
            (
                "cfg/app.yaml",
                "name: web\nports:\n  - 80\n  - 443\ntls: true\n",
            ),
            ("services/web/web-1", consul),
            ("services/web/web-2", consul_warn),
            ("services/api/10.1.0.1:9000", nacos),
            ("etcd/svc/a", r#"{"host":"h1","port":"81"}"#),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    )
}

fn ok(src: &str) -> String {
    let r = render("t", src, &data());
    r.output.unwrap_or_else(|e| panic!("{src:?}: {e}"))
}

fn err(src: &str) -> String {
    render("t", src, &data())
        .output
        .expect_err("render should fail")
}

#[test]
fn plain_text_is_copied_with_its_trailing_newline() {
    assert_eq!(ok("no actions\n"), "no actions\n");
    assert_eq!(ok(""), "");
    assert_eq!(ok("a } b { c }"), "a } b { c }");
}

#[test]
fn key_is_substituted_and_not_escaped() {
    assert_eq!(
        ok("listen {{ key(\"app/host\") }}:{{key('app/port')}};\n"),
        "listen example.org:8080;\n"
    );
    let d = Arc::new(Data::from([("x".to_owned(), "<a & b>".to_owned())]));
    assert_eq!(
        render("t.html", "{{ key('x') }}", &d).output.unwrap(),
        "<a & b>"
    );
}

#[test]
fn missing_key_fails_with_its_name_and_line() {
    let e = err("first\nx={{ key(\"app/missing\") }}");
    assert!(e.contains("missing key \"app/missing\""), "{e}");
    assert!(e.starts_with("line 2:"), "{e}");
}

#[test]
fn key_or_default_falls_back() {
    assert_eq!(
        ok("{{ key_or_default('app/port', '80') }} {{ key_or_default('app/tls', 'off') }}"),
        "8080 off"
    );
}

#[test]
fn keys_is_a_mapping_in_key_order() {
    assert_eq!(
        ok("{% for name, v in keys('db/') | items %}{{ name }}={{ v }}\n{% endfor %}"),
        "a=1\nb=2\nnested/c=3\n"
    );
    assert_eq!(
        ok("{{ keys('db/')['b'] }} {{ keys('db/') | length }}"),
        "2 3"
    );
    assert_eq!(ok("{{ keys('none/') | length }}"), "0");
}

#[test]
fn block_lines_leave_no_blank_lines() {
    let src = "upstream x {\n    {% for k, v in keys('db/') | items %}\n    server {{ v }};\n    {% endfor %}\n}\n";
    assert_eq!(
        ok(src),
        "upstream x {\n    server 1;\n    server 2;\n    server 3;\n}\n"
    );
}

#[test]
fn builtin_filters_work() {
    assert_eq!(ok("{{ key('app/host') | upper }}"), "EXAMPLE.ORG");
    assert_eq!(ok("{{ keys('db/') | list | join(',') }}"), "a,b,nested/c");
    // Jinja prints booleans and none the Python way; `default(x, true)`
    // also replaces none and empty values.
    assert_eq!(
        ok("{{ key_or_default('nope', none) | default('d', true) }}"),
        "d"
    );
    assert_eq!(
        ok("{{ true }} {{ true | lower }} {{ none }}"),
        "True true None"
    );
    assert_eq!(ok("{{ keys('db/').x | default('dflt') }}"), "dflt");
    assert_eq!(
        ok("{{ 'yes' if keys('db/').x is defined else 'no' }}"),
        "no"
    );
}

#[test]
fn undefined_is_strict() {
    let e = err("{{ keys('db/').missing }}");
    assert!(e.contains("undefined"), "{e}");
}

#[test]
fn json_and_yaml_parse_as_functions_and_filters() {
    assert_eq!(
        ok(
            "{{ json(key('cfg/app.json')).name }} {{ (key('cfg/app.json') | json).replicas | join('+') }}"
        ),
        "web 1+2"
    );
    assert_eq!(
        ok(
            "{% set c = key('cfg/app.yaml') | yaml %}{{ c.name }} {{ c.ports | join(',') }} {{ c.tls }}"
        ),
        "web 80,443 True"
    );
    assert!(err("{{ json('{') }}").contains("invalid JSON"));
    assert!(err("{{ yaml('a: [1') }}").contains("invalid YAML"));
    assert!(err("{{ yaml('a: 1\n---\nb: 2') }}").contains("2 documents"));
}

#[test]
fn services_reads_consul_and_nacos_instances() {
    assert_eq!(
        ok(
            "{% for i in services('web') %}{{ i.name }} {{ i.address }}:{{ i.port }} {{ i.healthy }} {{ i.tags | join(',') }} {{ i.meta.zone | default('-') }}\n{% endfor %}"
        ),
        "web-1 10.0.0.1:8080 True v2 a\nweb-2 10.0.0.2:8080 False  -\n"
    );
    assert_eq!(
        ok("{% for i in services('web') | selectattr('healthy') %}{{ i.id }}{% endfor %}"),
        "web-1"
    );
    assert_eq!(
        ok(
            "{% for i in services('api') %}{{ i.address }}:{{ i.port }} w={{ i.weight }} {{ i.id }} {{ i.meta.v }} {{ i.healthy }}{% endfor %}"
        ),
        "10.1.0.1:9000 w=2.0 i-1 1 True"
    );
    assert_eq!(ok("{{ services() | join(',') }}"), "api,web");
    assert_eq!(ok("{{ services('none') | length }}"), "0");
}

#[test]
fn instances_reads_any_prefix() {
    assert_eq!(
        ok(
            "{% for i in instances('etcd/svc/') %}{{ i.name }}={{ i.address }}:{{ i.port }} {{ i.healthy }} {{ i.weight }}{% endfor %}"
        ),
        "a=h1:81 True 1"
    );
    let bad = Arc::new(Data::from([("s/x".to_owned(), "{\"port\": 1}".to_owned())]));
    let e = render("t", "{{ instances('s/') }}", &bad)
        .output
        .unwrap_err();
    assert!(e.contains("instance s/x: no address"), "{e}");
}

#[test]
fn syntax_errors_name_the_line() {
    let e = err("ok\n{{ key('a' }}");
    assert!(e.starts_with("line 2:"), "{e}");
    let e = err("{{ bogus('x') }}");
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn deps_record_what_was_read() {
    let r = render(
        "t",
        "{{ key('app/port') }}{{ key_or_default('b', 'd') }}{{ keys('db/') | length }}{{ services('web') | length }}",
        &data(),
    );
    assert!(r.output.is_ok());
    assert!(r.deps.depends_on("app/port"));
    assert!(r.deps.depends_on("b"));
    assert!(r.deps.depends_on("db/anything/deep"));
    assert!(r.deps.depends_on("services/web/new"));
    assert!(!r.deps.depends_on("app/host"));
    assert!(!r.deps.depends_on("services/api/x"));
    // A failed render still records what it read up to the failure.
    let r = render("t", "{{ key('gone') }}{{ key('never') }}", &data());
    assert!(r.output.is_err());
    assert!(r.deps.depends_on("gone"));
    assert!(!r.deps.depends_on("never"));
}

#[test]
fn template_keys_map_to_output_paths() {
    assert_eq!(
        output_path("templates/app/app.conf.tmpl"),
        Some("app/app.conf")
    );
    assert_eq!(output_path("templates/x.tmpl"), Some("x"));
    assert_eq!(output_path("templates/.tmpl"), None);
    assert_eq!(output_path("templates/app/app.conf"), None);
    assert_eq!(output_path("other/app.conf.tmpl"), None);
    assert!(is_template("templates/a.tmpl"));
    assert!(!is_template("templates/a.txt"));
}

#[test]
fn the_nginx_upstream_example_renders() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/nginx-upstream/watched"
    );
    let read = |rel: &str| std::fs::read_to_string(format!("{dir}/{rel}")).unwrap();
    let src = read("templates/nginx/upstream.conf.tmpl");
    let mut data: Data = [
        "services/web/web-1",
        "services/web/web-2",
        "nginx/keepalive",
    ]
    .into_iter()
    .map(|k| (k.to_owned(), read(k)))
    .collect();
    data.insert(
        "services/api/10.1.0.1:9000".to_owned(),
        r#"{"service":"api","ip":"10.1.0.1","port":9000,"healthy":false,"weight":1.0,"cluster":"DEFAULT","instance_id":"i","metadata":{}}"#.to_owned(),
    );
    let out = render("upstream", &src, &Arc::new(data)).output.unwrap();
    assert_eq!(
        out,
        "# Generated by watchgate template-render; do not edit.\n\
         upstream api {\n    server 127.0.0.1:1 down;\n    keepalive 32;\n}\n\
         upstream web {\n    server 10.0.0.1:8080 weight=2;\n    server 10.0.0.2:8080;\n    keepalive 32;\n}\n"
    );
}
