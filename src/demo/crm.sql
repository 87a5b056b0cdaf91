-- pgveil demo: a small CRM data set (embedded in the binary by src/demo/mod.rs).
--
-- Run by `pgveil demo` as the superuser, in the freshly created database `crm`, in one
-- transaction. Every person, number and address below is invented: the names are
-- characters from wuxia novels, the phone numbers are 1xx0000xxxx, the e-mail domains
-- are the reserved example.* domains and the addresses are on 示例/演示/样例/测试
-- ("example/demo/sample/test") streets. The ID card and bank card numbers have valid
-- check digits (so they look real to masks and validators) but belong to nobody.
--
-- The database itself grants the demo logins everything they query: only pgveil, in
-- front of it, decides who sees what. That is the point of the demo.

-- Roles are cluster-wide. The logins carry no password: the throwaway cluster trusts
-- loopback connections, and pgveil relays authentication without ever needing one.
CREATE ROLE pgveil LOGIN;        -- pgveil's own catalog login (config `catalog.user`)
CREATE ROLE billing_svc LOGIN;   -- a billing service: policy role `billing`
CREATE ROLE alice LOGIN;         -- a support agent, member of crm_support
CREATE ROLE bi_reader LOGIN;     -- a BI tool's login: policy role `analyst`
CREATE ROLE guest LOGIN;         -- matches no policy role: gets role `default`
-- A group role: the policy names crm_support, not alice, so alice's role is found
-- through her membership (what a DBA does with real teams).
CREATE ROLE crm_support NOLOGIN;
GRANT crm_support TO alice;

CREATE TABLE public.customers (
    id         serial PRIMARY KEY,
    name       text NOT NULL,
    phone      text,
    id_card    text,
    bank_card  text,
    email      text,
    address    text,
    city       text,
    created_at date NOT NULL DEFAULT current_date
);

INSERT INTO public.customers (name, phone, id_card, bank_card, email, address, city, created_at) VALUES
    ('张三丰', '13800001001', '110101196204090111', '6222020200001234000', 'zhang.sanfeng@example.com', '北京市东城区示例胡同12号', '北京', '2023-01-09'),
    ('欧阳锋', '13900002002', '310104197003150238', '6217000010002000308', 'ouyang.feng@example.cn', '上海市徐汇区演示路88弄6号1202室', '上海', '2023-02-14'),
    ('李寻欢', '15000003003', '440305198511220352', '6228480000300045002', 'li.xunhuan@example.com', '广东省深圳市南山区样例大道3001号', '深圳', '2023-03-02'),
    ('黄蓉', '15100004004', '330106199008080481', '6214830000400068', 'huang.rong@example.org', '浙江省杭州市西湖区测试街45号', '杭州', '2023-03-21'),
    ('郭靖', '18600005005', '510107198801010513', '6212260000500000', 'guo.jing@example.com', '四川省成都市武侯区示例巷7号2单元', '成都', '2023-04-11'),
    ('令狐冲', '18700006006', '420111199202140671', '6236680000600074', 'linghu.chong@example.cn', '湖北省武汉市洪山区演示路100号', '武汉', '2023-05-05'),
    ('任盈盈', '13500007007', '320102199505200723', '6222020700007000008', 'ren.yingying@example.com', '江苏省南京市玄武区样例路21号', '南京', '2023-05-30'),
    ('段誉', '13600008008', '610113199307300895', '6217000800008000009', 'duan.yu@example.org', '陕西省西安市雁塔区测试大道8号', '西安', '2023-06-18'),
    ('乔峰', '17700009009', '440106197910100914', '6228480900009009', 'qiao.feng@example.com', '广东省广州市天河区示例路66号', '广州', '2023-07-07'),
    ('王语嫣', '19900010010', '320508199706011021', '6214831000010006', 'wang.yuyan@example.cn', '江苏省苏州市姑苏区演示巷3号', '苏州', '2023-08-01'),
    ('慕容复', '13800011011', '120101198303181132', '6225881100011005', 'murong.fu@example.com', '天津市和平区样例道19号', '天津', '2023-08-26'),
    ('杨过', '13900012012', '500103199112251255', '6212261200012000001', 'yang.guo@example.com', '重庆市渝中区测试路52号', '重庆', '2023-09-15'),
    ('赵敏', '15000013013', '430104199609121366', '6236681300013000009', 'zhao.min@example.org', '湖南省长沙市岳麓区示例街9号', '长沙', '2023-10-04'),
    ('周芷若', '15100014014', '350203199804031488', '6222021400014000005', 'zhou.zhiruo@example.com', '福建省厦门市思明区演示路17号', '厦门', '2023-10-29'),
    ('张无忌', '18600015015', '370202199411111572', '6217001500015000005', 'zhang.wuji@example.cn', '山东省青岛市市南区样例路5号', '青岛', '2023-11-20'),
    ('韦小宝', '18700016016', '32100220000229161X', '6228481600016000008', 'wei.xiaobao@example.com', '江苏省扬州市广陵区测试巷16号', '扬州', '2023-12-12'),
    ('东方不败', '13500017017', '350102197506061776', '6214831700017000002', NULL, '福建省福州市鼓楼区示例路1号', '福州', '2024-01-08'),
    ('司马青衫', '13600018018', '530102198709191819', '6225881800018003', 'sima.qingshan@example.com', '云南省昆明市五华区演示街28号', '昆明', '2024-02-19'),
    ('林平之', '17700019019', '410105199901271938', '6212261900019000009', 'lin.pingzhi@example.org', '河南省郑州市金水区样例路77号', '郑州', '2024-03-27'),
    ('陈家洛', '19900020020', '340104198208172051', NULL, 'chen.jialuo@example.com', '安徽省合肥市蜀山区测试大道20号', '合肥', '2024-05-16');

CREATE TABLE public.orders (
    id          serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers (id),
    amount      numeric(12,2) NOT NULL,
    status      text NOT NULL,
    ordered_at  timestamptz NOT NULL
);

-- 50 orders, spread over the customers, amounts and dates; generated rather than
-- listed, but deterministic, so every demo run shows the same rows.
INSERT INTO public.orders (customer_id, amount, status, ordered_at)
SELECT 1 + (i * 7) % 20,
       round((59 + (i * 7919) % 4800 + (i * 37) % 100 / 100.0)::numeric, 2),
       (ARRAY['paid', 'shipped', 'delivered', 'delivered', 'refunded', 'pending'])[1 + i % 6],
       timestamptz '2024-01-03 09:15:00+08' + i * interval '6 days 5 hours 13 minutes'
FROM generate_series(1, 50) AS i;

-- A view over protected columns: PostgreSQL reports the view's OID for its columns, so
-- pgveil must follow the view's definition back to customers.phone and .email.
CREATE VIEW public.customer_contacts AS
SELECT id, name, phone, email
FROM public.customers;

-- A view over that view: the lineage is two levels deep (support_queue →
-- customer_contacts → customers), and the same column rules must still apply.
CREATE VIEW public.support_queue AS
SELECT o.id AS order_id, o.status, o.amount, o.ordered_at,
       c.name, c.phone, c.email
FROM public.orders o
JOIN public.customer_contacts c ON c.id = o.customer_id
WHERE o.status IN ('pending', 'refunded');

-- Everything to every demo login (but not to pgveil's catalog login, which only ever
-- reads the system catalogs): the database allows all; pgveil restricts.
GRANT USAGE ON SCHEMA public TO billing_svc, crm_support, bi_reader, guest;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public
    TO billing_svc, crm_support, bi_reader, guest;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public
    TO billing_svc, crm_support, bi_reader, guest;
